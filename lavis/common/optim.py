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


def parameter_groups(components: dict[str, nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups per (component, decay) with their trainable parameters; empty groups are dropped."""
    groups = []
    seen: set[int] = set()
    for comp_name, component in components.items():
        decay, no_decay = [], []
        for module in component.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (no_decay if no_weight_decay(module, name, param) else decay).append(param)
        for params, wd, suffix in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "weight_decay": wd, "name": f"{comp_name}.{suffix}", "lr_scale": 1.0})
    return groups


def build_optimizer(components: dict[str, nn.Module], run) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, configured from :class:`RunConfig`."""
    groups = parameter_groups(components, run.weight_decay)
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
