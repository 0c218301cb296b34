"""Optimiser parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lavis.common.registry import registry

# Parameters held directly by a module that act as embeddings (no weight decay), whatever their shape.
EMBEDDING_PARAM_NAMES = {"pos_embed", "cls_token", "reg_token", "mask_token", "query"}


def no_weight_decay(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (1-D), embedding tables and learned position/query embeddings."""
    return param.ndim < 2 or isinstance(module, nn.Embedding) or param_name in EMBEDDING_PARAM_NAMES


def parameter_groups(
    components: dict[str, nn.Module],
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    layer_decay: float | None = None,
) -> list[dict]:
    """AdamW groups of the trainable parameters, per (component, decay or not, layer).

    Each group's ``lr_scale`` multiplies the scheduled learning rate: the component's scale, times
    ``layer_decay ** (num_layers + 1 - layer_id)`` for components that report layers (the ViT:
    block ``i`` of ``N`` gets ``decay ** (N - i)``, its embeddings ``decay ** (N + 1)``).
    """
    lr_scale = lr_scale or {}
    groups: dict[tuple, dict] = {}
    seen: set[int] = set()
    for comp_name, component in components.items():
        layered = layer_decay is not None and hasattr(component, "layer_id")
        for module_name, module in component.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                decays = not no_weight_decay(module, name, param)
                scale = lr_scale.get(comp_name, 1.0)
                layer = None
                if layered:
                    layer = component.layer_id(f"{module_name}.{name}" if module_name else name)
                    scale *= layer_decay ** (component.num_layers + 1 - layer)
                key = (comp_name, decays, layer)
                if key not in groups:
                    label = f"{comp_name}.{'decay' if decays else 'no_decay'}" + ("" if layer is None else f".layer{layer}")
                    groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "name": label, "lr_scale": scale}
                groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(components: dict[str, nn.Module], run) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, configured from :class:`RunConfig`."""
    scales = vars(run.lr_scale) if not isinstance(run.lr_scale, dict) else run.lr_scale
    groups = parameter_groups(components, run.weight_decay, scales, run.layer_decay)
    if not groups:
        raise ValueError("nothing to train: every component is frozen")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=run.lr, betas=tuple(run.betas), eps=run.eps, fused=fused or None)


@registry.register("lr_scheduler", "linear_warmup_cosine")
def linear_warmup_cosine(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@registry.register("lr_scheduler", "constant")
def constant_with_warmup(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up, then constant ``lr``."""
    return lr * (step + 1) / warmup_steps if step < warmup_steps else lr
