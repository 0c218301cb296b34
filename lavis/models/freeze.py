"""Per-component freeze policies and parameter counts."""

from __future__ import annotations

from torch import nn

POLICIES = ("trainable", "frozen")


def apply_freeze_policy(component: nn.Module, policy: str) -> None:
    """``trainable``: every parameter trains. ``frozen``: no gradients, eval mode, not in the optimiser."""
    if policy not in POLICIES:
        raise ValueError(f"unknown freeze policy '{policy}'; expected one of {', '.join(POLICIES)}")
    component.requires_grad_(policy == "trainable")
    if policy == "frozen":
        component.eval()


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


def format_parameter_counts(counts: dict[str, dict[str, int]], policies: dict[str, str]) -> str:
    """A small table: component, policy, total and trainable parameters."""
    lines = [f"{'component':<10} {'policy':<10} {'parameters':>15} {'trainable':>15}"]
    for name, c in counts.items():
        lines.append(f"{name:<10} {policies.get(name, ''):<10} {c['total']:>15,} {c['trainable']:>15,}")
    return "\n".join(lines)
