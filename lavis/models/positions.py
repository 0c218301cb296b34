"""Position ids of the LLM's input: 1-D (each sample from 0), or M-RoPE's 3-D (temporal, height, width).

M-RoPE (Qwen2-VL): a text token's three positions are equal and count on from the previous token; an
image's tokens, a ``(t, h, w)`` grid read row-major, sit at ``start + (t_i, h_i, w_i)`` where
``start`` is the position the first of them would have had as text; the text after the image goes on
from ``start + max(h, w)``. Every sample starts at 0, so a packed row computes each sample's positions
as it would alone: that is what makes packing exact under M-RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions counting only attended tokens: ``cumsum(mask) - 1``, 0 at pads."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def mrope_position_ids(
    input_ids: torch.Tensor, positions: torch.Tensor, token_grids: Sequence[Sequence[int]], image_pad_id: int | Sequence[int],
    time_intervals: Sequence[float] | None = None,
) -> torch.Tensor:
    """``[3, B, L]`` M-RoPE position ids (see the module notes).

    ``positions``: the 1-D positions ``[B, L]`` (each sample counting from 0: a packed row restarts at
    every sample; pads anywhere). ``token_grids``: each image's (or video's) token grid ``(t, h, w)``,
    in the order of their pad-token runs in the flattened batch (``image_pad_id``: the pad token, or
    several: images' and videos'); together they cover every such token. ``time_intervals``: the
    temporal position step of each (1 for images and Qwen2-VL's videos; Qwen2.5-VL's videos:
    ``tokens_per_second x seconds per temporal patch``, its time-aligned positions), truncated to
    integers as transformers does. The text after an item continues from ``start + max(h, w)``,
    whatever its frames (transformers 5's ``get_rope_index``).
    """
    batch, length = input_ids.shape
    out = positions.long().unsqueeze(0).repeat(3, 1, 1)
    if not len(token_grids):
        return out
    device = input_ids.device
    grids = torch.as_tensor([list(g) for g in token_grids], dtype=torch.long, device=device)
    counts = grids.prod(-1)
    pad_ids = torch.as_tensor([image_pad_id] if isinstance(image_pad_id, int) else list(image_pad_id), device=device)
    flat_image = torch.isin(input_ids, pad_ids).flatten().nonzero().squeeze(-1)
    if flat_image.numel() != int(counts.sum()):
        raise ValueError(f"{len(token_grids)} images of {int(counts.sum())} tokens for {flat_image.numel()} image positions")
    offsets = torch.cumsum(counts, 0) - counts  # index of each image's first token among the image tokens
    starts = flat_image[offsets]
    # Each image moves the text after it by max(h, w) - its token count, up to the end of its sample.
    ends = starts + counts
    shift = torch.zeros(batch * length, dtype=torch.long, device=device)
    inside = ends % length != 0  # an image ending its row shifts nothing
    shift.index_add_(0, ends[inside], (grids[:, 1:].amax(-1) - counts)[inside])
    shift = shift.view(batch, length)
    columns = torch.arange(length, device=device).expand(batch, length)
    sample_start = torch.where((positions == 0) | (columns == 0), columns, 0).cummax(-1).values
    total = shift.cumsum(-1)
    shifted = positions.long() + total - (total - shift).gather(-1, sample_start)
    out[:] = shifted
    # Image tokens: start + (t, h, w) offsets, row-major within each image.
    local = torch.arange(flat_image.numel(), device=device) - offsets.repeat_interleave(counts)
    t, h, w = (grids[:, k].repeat_interleave(counts) for k in range(3))
    base = shifted.flatten()[starts].repeat_interleave(counts)
    frame = local // (h * w)
    if time_intervals is not None:  # float32 steps truncated, as transformers computes them
        step = torch.as_tensor(list(time_intervals), dtype=torch.float32, device=device).repeat_interleave(counts)
        frame = (frame * step).long()
    offsets_thw = torch.stack([frame, (local // w) % h, local % w])
    out.view(3, -1)[:, flat_image] = base + offsets_thw
    return out
