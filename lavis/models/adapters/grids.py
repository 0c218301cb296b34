"""Patch grids as the adapters receive them: ``(rows, cols)`` of a fixed-size image (one grid for the
batch), or a ``[n, 3]`` tensor of ``(t, h, w)`` per image at native resolution, the features then
flattened to ``[patches, width]`` image after image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grid = tuple[int, int] | Sequence[int] | torch.Tensor


def as_thw(grid: Grid) -> tuple[int, int, int]:
    """One image's grid as ``(t, h, w)``: a ``(rows, cols)`` grid is one frame."""
    values = [int(v) for v in grid]
    if len(values) == 2:
        return 1, values[0], values[1]
    if len(values) != 3:
        raise ValueError(f"a patch grid is (rows, cols) or (t, h, w), got {values}")
    return values[0], values[1], values[2]


def is_native(grid: Grid) -> bool:
    """Whether ``grid`` is the per-image grids of native-resolution features (a ``[n, 3]`` tensor)."""
    return isinstance(grid, torch.Tensor) and grid.dim() == 2


def split_images(x: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Native-resolution features ``[patches, width]`` -> one ``[t*h*w, width]`` tensor per image."""
    return list(x.split(grid_thw.prod(-1).tolist()))


def windows_to_rows(x: torch.Tensor, grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Native-resolution features in Qwen2-VL's processor order (``merge_size`` windows row-major,
    patches row-major within each) -> each image's patches row-major over its whole grid."""
    order, start = [], 0
    m = merge_size
    for t, h, w in grid_thw.tolist():
        window_order = torch.arange(start, start + t * h * w, device=x.device).view(t, h // m, w // m, m, m)
        order.append(window_order.permute(0, 1, 3, 2, 4).flatten())
        start += t * h * w
    return x[torch.cat(order)] if order else x
