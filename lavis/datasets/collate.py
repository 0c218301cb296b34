"""Collators: samples -> a padded batch."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from lavis.processors.conversation import IGNORE_INDEX


class PadCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with ``IGNORE_INDEX``) to the longest sample.

    All images of the batch are concatenated in sample order, which is the order of their
    ``<imgpad>`` spans in the flattened batch. ``skipped`` counts the replaced samples by reason.
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
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "skipped": Counter(r for s in samples for r in s.get("skipped", ())),
        }
