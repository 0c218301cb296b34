"""Turn one annotation record into model inputs: token ids, labels and pixel tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lavis.processors.conversation import ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.image import load_image


class SampleProcessor:
    """Record ``{"messages", "image_root", ...}`` -> ``{"input_ids", "labels", "pixel_values"}``."""

    def __init__(self, encoder: ConversationEncoder, image_processor: Callable) -> None:
        self.encoder = encoder
        self.image_processor = image_processor

    def __call__(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        enc = self.encoder.truncate(self.encoder.encode_messages(record["messages"]))
        root = Path(record.get("image_root") or "")
        images = [self.image_processor(load_image(self._resolve(root, path))) for path in enc.images]
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
