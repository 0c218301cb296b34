"""Per-patch projectors: ``mlp`` (LLaVA-1.5's ``mlp2x_gelu``) and ``linear``."""

from __future__ import annotations

import torch
from torch import nn

from lavis.common.registry import registry


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

    def output_length(self, grid: tuple[int, int]) -> int:
        """Tokens per image: one per patch."""
        return grid[0] * grid[1]

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``x``: ``[B, rows*cols, vision_width]`` -> ``[B, rows*cols, llm_hidden_size]``."""
        return self.proj(x)


@registry.register("adapter", "linear")
class LinearAdapter(MLPAdapter):
    """A single Linear layer applied to every patch (the one-layer ``mlp``)."""

    def __init__(self, vision_width: int, llm_hidden_size: int) -> None:
        super().__init__(vision_width, llm_hidden_size, num_layers=1)
