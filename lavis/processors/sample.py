"""Turn one annotation record into model inputs: token ids, labels and pixel tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lavis.processors.conversation import ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.image import load_image


class SampleProcessor:
    """A record -> ``{"input_ids", "labels", "pixel_values"}``.

    Records are conversations (``{"messages": [{"role", "content"}]}``, ChatML) or prompt/target
    pairs (``{"prompt", "target"}``, the pretraining formats). Images come from
    ``image_root``/path, or from ``image_bytes[path]`` for records read out of shards.
    ``truncate``: cut samples longer than ``max_len`` (see ``ConversationEncoder.truncate``);
    otherwise they are returned whole for the caller to drop.
    """

    def __init__(self, encoder: ConversationEncoder, image_processor: Callable, truncate: bool = True) -> None:
        self.encoder = encoder
        self.image_processor = image_processor
        self.truncate = truncate

    def __call__(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "messages" in record:
            enc = self.encoder.encode_messages(record["messages"])
        else:
            enc = self.encoder.encode_prompt(record["prompt"], record["target"])
        if self.truncate:
            enc = self.encoder.truncate(enc)
        root = Path(record.get("image_root") or "")
        in_memory = record.get("image_bytes") or {}
        images = [
            self.image_processor(
                load_image(path, in_memory[path]) if path in in_memory else load_image(self._resolve(root, path))
            )
            for path in enc.images
        ]
        size = self.image_processor.image_size
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": torch.stack(images) if images else torch.zeros(0, 3, size, size),
        }

    @staticmethod
    def _resolve(root: Path, path: str) -> Path:
        if "://" in path:
            raise SkipSample("remote_image", f"image URLs are not fetched: {path} (download it and use a local path)")
        return root / path
