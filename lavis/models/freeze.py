"""Freeze policies: how each component of the model trains, one registered object per component.

``model.freeze.<component>`` names a policy (``trainable``, ``frozen``, ``lora``, ``qlora``) or gives
a block with its keys (``{policy: lora, r: 16}``; ``type`` works as well as ``policy``). A policy is
applied once, after the component is built and its starting weights are loaded, and before any
wrapping (activation checkpointing, sharding).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lavis.common.registry import registry

log = logging.getLogger(__name__)

# LoRA targets by model family when the policy names none. Qwen2 (what Qwen-VL's converted LLM is):
# the modules Qwen-VL's finetune.py targets in Qwen-1 (c_attn, attn.c_proj, w1, w2), in Qwen2's names.
# Qwen2-VL / Qwen2.5-VL's language models (qwen2_vl_lm) have Qwen2's layer names; their ViT (qwen2_vl_vit)
# has timm's attention names, and fc1/fc2 (Qwen2-VL) or gate/up/down_proj (Qwen2.5-VL) in its MLP.
LORA_TARGETS: dict[str, list[str]] = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj"],
    "timm_vit": ["qkv", "attn.proj", "fc1", "fc2"],
    "qwen2_vl_vit": ["qkv", "attn.proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj"],
}
LORA_TARGETS["qwen2_vl_text"] = LORA_TARGETS["qwen2_5_vl_text"] = LORA_TARGETS["qwen2"]
LORA_ADAPTER = "default"  # peft's adapter name: part of the LoRA parameters' names in checkpoints


class FreezePolicy:
    """How one component trains; subclasses are registered under the kind ``freeze_policy``."""

    registry_name: str
    keeps_eval_mode = False  # the component stays in eval mode while the model trains

    def apply(self, component: nn.Module, meta: bool = False) -> None:
        """Set which of ``component``'s parameters train (possibly adding parameters, e.g. LoRA)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The policy as written in configs and checkpoint metadata."""
        return {"type": self.registry_name}

    def __str__(self) -> str:
        return self.registry_name


@registry.register("freeze_policy", "trainable")
class Trainable(FreezePolicy):
    """Every parameter trains."""

    def apply(self, component: nn.Module, meta: bool = False) -> None:
        component.requires_grad_(True)


@registry.register("freeze_policy", "frozen")
class Frozen(FreezePolicy):
    """No gradients, eval mode (dropout off), not in the optimiser, not in trainable-only checkpoints."""

    keeps_eval_mode = True

    def apply(self, component: nn.Module, meta: bool = False) -> None:
        component.requires_grad_(False)
        component.eval()


@registry.register("freeze_policy", "lora")
@dataclass
class LoRA(FreezePolicy):
    """Low-rank adapters (peft) on the ``targets`` linear layers; every other parameter is frozen,
    except those whose names end with an entry of ``trainable`` (e.g. ``[embed_tokens, lm_head]``,
    trained whole, as Qwen-VL's finetune.py does for the base model).

    ``targets``: module names or name suffixes (peft's ``target_modules``); null takes the default of
    the component's family (:data:`LORA_TARGETS`). The update is ``alpha / r * B @ A``.
    """

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] | None = None
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"{self.registry_name}: r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{self.registry_name}: dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def describe(self) -> dict[str, Any]:
        return {"type": self.registry_name, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        return f"{self.registry_name} r={self.r}"

    def target_modules(self, component: nn.Module) -> list[str]:
        """The configured targets, or the family's default; an error names the linear layers to pick from."""
        if self.targets:
            return list(self.targets)
        family = lora_family(component)
        if family in LORA_TARGETS:
            return LORA_TARGETS[family]
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

        if family in PEFT_TARGETS:
            return list(PEFT_TARGETS[family])
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in component.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora: no default targets for a '{family}' component; set 'targets' (its linear layers: {linear})")

    def apply(self, component: nn.Module, meta: bool = False) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = self.target_modules(component)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets)
        inject_adapter_in_model(config, component, adapter_name=LORA_ADAPTER)  # freezes the rest of the component
        kept = [p for name, p in component.named_parameters() if name.rsplit(".", 1)[0].endswith(tuple(self.trainable))]
        if self.trainable and not kept:
            raise ValueError(f"lora: 'trainable' {self.trainable} names no parameters of this component")
        for p in kept:
            p.requires_grad_(True)


@registry.register("freeze_policy", "qlora")
@dataclass
class QLoRA(LoRA):
    """LoRA over the component's linear layers stored in 4-bit NF4 (bitsandbytes; CUDA only), as
    Q-LoRA: the frozen base weights are quantised, the adapters train in ``compute_dtype``.
    ``skip``: linear layers left unquantised (the LM head by default, as peft and finetune.py do)."""

    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"qlora: compute_dtype must be bfloat16, float16 or float32, got '{self.compute_dtype}'")

    def apply(self, component: nn.Module, meta: bool = False) -> None:
        if not meta:  # counting parameters on the meta device needs neither a GPU nor bitsandbytes
            quantize_linear_layers(component, getattr(torch, self.compute_dtype), self.double_quant, self.skip)
        super().apply(component, meta)


def quantize_linear_layers(component: nn.Module, compute_dtype: torch.dtype, double_quant: bool, skip: list[str]) -> int:
    """Replace ``component``'s ``nn.Linear`` layers (but those named in ``skip``) by bitsandbytes'
    4-bit NF4 layers on the current CUDA device; returns how many were replaced."""
    if not torch.cuda.is_available():
        raise RuntimeError("policy qlora stores weights in 4-bit NF4 with bitsandbytes, which needs a CUDA GPU; "
                           "on this machine use policy lora (the same adapters over unquantised weights)")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RuntimeError("policy qlora needs bitsandbytes: pip install bitsandbytes") from None
    device = torch.device("cuda", torch.cuda.current_device())
    replaced = 0
    for parent_name, parent in list(component.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or any(full == s or full.endswith(f".{s}") for s in skip):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                             compress_statistics=double_quant, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, layer.to(device))  # moving to CUDA quantises the weight
            replaced += 1
    log.info("qlora: %d linear layers stored in 4-bit NF4", replaced)
    return replaced


def lora_family(component: nn.Module) -> str:
    """What a component is, for default LoRA targets: an HF model's ``model_type``, else its registered name."""
    config = getattr(component, "config", None)
    return getattr(config, "model_type", None) or getattr(component, "registry_name", type(component).__name__)


def merge_lora(component: nn.Module) -> int:
    """Fold every LoRA adapter of ``component`` into its base layer and remove the adapters, in place
    (the plain module structure and parameter names return); returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for _, parent in list(component.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                setattr(parent, name, child.get_base_layer())
                merged += 1
    return merged


def merge_lora_state(
    state: dict[str, torch.Tensor], scales: dict[str, float], base: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A state dict with LoRA adapters (``X.lora_A.default.weight``, ``X.lora_B...``, ``X.base_layer.*``)
    folded into plain weights (``X.weight = W + scale * B @ A``).

    ``W`` comes from ``state``, else from ``base`` (e.g. the weights a model already holds, when the
    adapters come alone); ``scales``: ``alpha / r`` per component (the first part of the names).
    """
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    suffix = f".lora_A.{LORA_ADAPTER}.weight"
    for key in [k for k in state if k.endswith(suffix)]:
        module = key[: -len(suffix)]
        down, up = state[key], state[f"{module}.lora_B.{LORA_ADAPTER}.weight"]
        name = f"{module}.weight"
        weight = out.get(name, (base or {}).get(name))
        if weight is None:
            raise KeyError(f"LoRA adapter of {module} without its base weight")
        scale = scales[module.split(".", 1)[0]]
        out[name] = (weight.float() + scale * (up.float() @ down.float())).to(weight.dtype)
    return out


def lora_scales(policies: dict[str, Any]) -> dict[str, float]:
    """``alpha / r`` per component whose policy (as :meth:`FreezePolicy.describe` writes it) is LoRA."""
    scales = {}
    for name, policy in policies.items():
        block = policy if isinstance(policy, dict) else {"type": policy}
        if block.get("type") in ("lora", "qlora"):
            scales[name] = block["alpha"] / block["r"]
    return scales


def parameter_counts(components: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """``{component: {"total": n, "trainable": n}}`` plus a ``"total"`` row."""
    counts = {}
    for name, module in components.items():
        params = list(module.parameters())
        counts[name] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    counts["total"] = {key: sum(c[key] for c in counts.values()) for key in ("total", "trainable")}
    return counts


def format_parameter_counts(counts: dict[str, dict[str, int]], policies: dict[str, Any]) -> str:
    """A small table: component, policy, total and trainable parameters."""
    lines = [f"{'component':<10} {'policy':<10} {'parameters':>15} {'trainable':>15}"]
    for name, c in counts.items():
        lines.append(f"{name:<10} {str(policies.get(name, '')):<10} {c['total']:>15,} {c['trainable']:>15,}")
    return "\n".join(lines)
