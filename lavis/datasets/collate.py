"""Collators: samples -> a padded batch."""

from __future__ import annotations

from typing import Any

import torch

from lavis.processors.conversation import IGNORE_INDEX
from lavis.processors.native_image import PatchImages, cat_images


class PadCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with ``IGNORE_INDEX``) to the longest sample.

    All images of the batch are concatenated in sample order, which is the order of their
    ``<imgpad>`` spans in the flattened batch.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": cat_images([s["pixel_values"] for s in samples]),
            "num_samples": len(samples),
            "num_input_tokens": int(attention_mask.sum()),
        }


class PackCollator:
    """Rows of several samples -> one batch whose samples cannot see each other.

    Each sample keeps its own position ids (0, 1, ...). Isolation depends on the attention kernel:
    ``block_mask`` builds a block-diagonal causal mask ``[B, 1, L, L]`` (SDPA, eager);
    ``cu_seqlens`` passes no mask but ``attention_kwargs`` with the cumulative sequence lengths of the
    flattened batch (``cu_seq_lens_q/k``, ``max_length_q/k``) for flash-attention's varlen kernel.
    (Position ids alone do not reliably isolate samples: transformers only infers boundaries from
    them in some cases, e.g. flash-attention with a batch of one row.) The first token of every
    sample is unsupervised, as it is unpacked: nothing before it belongs to its sample.

    A sample may branch (a preference pair, :mod:`lavis.tasks.dpo`): ``branch`` gives each of its tokens
    0 (the shared prefix, seen by every branch) or a branch number (seen only by its own branch), and its
    ``position_ids`` (each branch continuing from the prefix). Only ``block_mask`` can isolate branches.
    """

    def __init__(self, pad_id: int, isolation: str = "block_mask") -> None:
        if isolation not in ("block_mask", "cu_seqlens"):
            raise ValueError(f"unknown packing isolation '{isolation}'; expected block_mask or cu_seqlens")
        self.pad_id = pad_id
        self.isolation = isolation

    def __call__(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        length = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        # Segment id per position; padding gets ids of its own so that it only sees itself.
        segments = torch.arange(length).repeat(batch, 1) + length
        branches = torch.zeros((batch, length), dtype=torch.long)  # 0: seen by the whole sample
        attention = torch.zeros((batch, length), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for s, sample in enumerate(row):
                n = len(sample["input_ids"])
                end = start + n
                input_ids[r, start:end] = sample["input_ids"]
                labels[r, start:end] = sample["labels"]
                labels[r, start] = IGNORE_INDEX
                position_ids[r, start:end] = sample["position_ids"] if "position_ids" in sample else torch.arange(n)
                if "branch" in sample:
                    branches[r, start:end] = sample["branch"]
                segments[r, start:end] = s
                attention[r, start:end] = 1
                start = end
            position_ids[r, start:] = torch.arange(length - start)
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "pixel_values": cat_images([s["pixel_values"] for row in rows for s in row]),
            "num_samples": sum(len(row) for row in rows),
            "num_input_tokens": int(attention.sum()),
        }
        if self.isolation == "block_mask":
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            visible = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])  # [query, key]
            out["attention_mask"] = ((segments[:, :, None] == segments[:, None, :]) & causal & visible)[:, None]
        elif branches.any():
            raise ValueError("branched samples (a shared prefix) need isolation block_mask: flash-attention's varlen "
                             "kernel cannot express a prefix that two branches share")
        else:
            out["attention_mask"] = None
            out["attention_kwargs"] = cu_seqlens_kwargs(segments)
        return out


def cu_seqlens_kwargs(segments: torch.Tensor) -> dict[str, Any]:
    """flash-attention varlen arguments for the flattened batch: one sequence per run of equal
    segment ids in each row (every padding position is a sequence of its own)."""
    flat = segments.flatten()
    row_starts = torch.zeros_like(segments, dtype=torch.bool)
    row_starts[:, 0] = True
    starts = (torch.cat([flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]]) | row_starts.flatten())
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
    max_length = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_length, "max_length_k": max_length}

def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch's tensors (and native images' patches) on ``device``, other values as they are."""
    def move(value):
        if torch.is_tensor(value) or isinstance(value, PatchImages):
            return value.to(device, non_blocking=True)
        return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value

    return move(batch)
