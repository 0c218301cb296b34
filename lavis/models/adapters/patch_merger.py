"""Qwen2-VL's patch merger: every ``merge_size`` x ``merge_size`` window of patches becomes one token.

Mirrors transformers' ``PatchMerger`` (Qwen2-VL) and ``Qwen2_5_VLPatchMerger`` (Qwen2.5-VL, ``norm:
rmsnorm``): ``ln_q`` on each patch, the window's patches concatenated into one vector of
``merge_size**2 * vision_width``, then ``mlp`` = Linear -> GELU -> Linear. Parameter names are
transformers' (``ln_q.weight``, ``mlp.0.weight``, ``mlp.2.weight``, ...), so a Qwen2-VL checkpoint's
``visual.merger.<name>`` maps onto ``adapter.<name>`` one to one.

Qwen2-VL's processor hands its vision tower the patches already ordered window by window, and a
native-resolution encoder (``qwen2_vl_vit``) keeps that order: its windows are merged as they come.
A fixed-size encoder (the timm ViT) emits patches row-major over the whole grid, so there
:meth:`PatchMerger.forward` gathers each window itself (windows row-major, patches row-major within
a window: the order of Qwen2-VL's processor).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lavis.common.registry import registry
from lavis.models.adapters.grids import Grid, as_thw, is_native
from lavis.models.hf_checkpoint import load_into, visual_key


class RMSNorm(nn.Module):
    """Qwen2.5-VL's ``Qwen2RMSNorm``: normalised in float32, cast back, then scaled by ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


NORMS = {"layernorm": lambda d: nn.LayerNorm(d, eps=1e-6), "rmsnorm": lambda d: RMSNorm(d, eps=1e-6)}


@registry.register("adapter", "patch_merger")
class PatchMerger(nn.Module):
    """``ln_q`` per patch, each ``merge_size``-square window as one vector, ``mlp`` to the LLM width.

    Output length is ``(rows // merge_size) * (cols // merge_size)``; a grid that ``merge_size`` does
    not divide is an error (no padding). ``pretrained``: a local transformers Qwen2-VL / Qwen2.5-VL
    checkpoint directory, whose ``visual.merger.*`` weights are loaded.
    """

    def __init__(self, vision_width: int, llm_hidden_size: int, merge_size: int = 2, norm: str = "layernorm",
                 pretrained: str | None = None) -> None:
        super().__init__()
        if merge_size < 1:
            raise ValueError(f"patch_merger: merge_size must be >= 1, got {merge_size}")
        if norm not in NORMS:
            raise ValueError(f"patch_merger: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.merge_size = merge_size
        self.vision_width = vision_width
        self.hidden_size = vision_width * merge_size**2
        self.ln_q = NORMS[norm](vision_width)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, llm_hidden_size),
        )
        if pretrained and torch.get_default_device().type != "meta":  # meta: shapes only
            load_into(self, Path(pretrained), lambda key: visual_key(key, merger=True), "model.adapter.pretrained")

    # A native-resolution encoder hands the patches over window by window (Qwen2-VL's processor order).
    takes_windows = True

    def _check_grid(self, grid: Grid) -> tuple[int, int, int]:
        t, rows, cols = as_thw(grid)
        m = self.merge_size
        if rows % m or cols % m:
            raise ValueError(
                f"patch_merger: the patch grid {rows}x{cols} (model.vision.image_size / patch size) is not "
                f"divisible by model.adapter.merge_size={m}; choose an image_size that is a multiple of "
                f"patch size x {m}"
            )
        return t, rows // m, cols // m

    def output_length(self, grid: Grid) -> int:
        """Tokens per image: one per ``merge_size`` x ``merge_size`` window of the patch grid."""
        t, rows, cols = self._check_grid(grid)
        return t * rows * cols

    def token_grid(self, grid: Grid) -> tuple[int, int, int]:
        """The image's tokens as a ``(t, h, w)`` grid, row-major (for 3-D positions): its windows."""
        return self._check_grid(grid)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``x``: ``[B, rows*cols, vision_width]``, row-major -> ``[B, windows, llm_hidden_size]``. At native
        resolution (``x`` ``[patches, vision_width]``, window by window as Qwen2-VL's processor orders
        them, ``grid`` ``[n, 3]``) -> ``[patches / merge_size**2, llm_hidden_size]``."""
        if is_native(grid):
            for thw in grid.tolist():
                self._check_grid(thw)
            return self.mlp(self.ln_q(x).reshape(-1, self.hidden_size))
        _, rows, cols = self._check_grid(grid)
        b, n, d = x.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"patch_merger: {n} patches for a {grid[0]}x{grid[1]} grid")
        m = self.merge_size
        x = self.ln_q(x)  # per patch, so before or after the reordering alike
        # [B, rows, m, cols, m, D] -> [B, rows, cols, m, m, D]: windows row-major, (0,0), (0,1), (1,0), (1,1) within.
        x = x.reshape(b, rows, m, cols, m, d).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(x.reshape(b, rows * cols, self.hidden_size))
