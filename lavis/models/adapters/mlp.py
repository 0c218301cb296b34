"""Per-patch projectors: ``mlp`` (LLaVA-1.5's ``mlp2x_gelu``) and ``linear``."""

from __future__ import annotations

import torch
from torch import nn

from lavis.common.registry import registry
from lavis.models.adapters.grids import Grid, as_thw


@registry.register("adapter", "mlp")
class MLPAdapter(nn.Module):
    """``num_layers`` Linear layers with GELU between, applied to every patch (LLaVA-1.5 for 2)."""

    def __init__(self, vision_width: int, llm_hidden_size: int, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [nn.Linear(vision_width, llm_hidden_size)]
        for _ in range(num_layers - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size)]
        # Same layout as LLaVA's mm_projector Sequential: proj.0, proj.2, ...
        self.proj = nn.Sequential(*layers)

    def output_length(self, grid: Grid) -> int:
        """Tokens per image: one per patch."""
        t, h, w = as_thw(grid)
        return t * h * w

    def token_grid(self, grid: Grid) -> tuple[int, int, int]:
        """The image's tokens as a ``(t, h, w)`` grid, row-major (for 3-D positions): its patch grid."""
        return as_thw(grid)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``x``: ``[B, rows*cols, vision_width]`` -> ``[B, rows*cols, llm_hidden_size]`` (native resolution:
        ``[patches, vision_width]`` row-major per image -> ``[patches, llm_hidden_size]``)."""
        return self.proj(x)


@registry.register("adapter", "linear")
class LinearAdapter(MLPAdapter):
    """A single Linear layer applied to every patch (the one-layer ``mlp``)."""

    def __init__(self, vision_width: int, llm_hidden_size: int) -> None:
        super().__init__(vision_width, llm_hidden_size, num_layers=1)
