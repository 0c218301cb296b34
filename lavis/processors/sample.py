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
    """A record -> ``{"input_ids", "labels", "pixel_values"}`` (``pixel_values``: the image processor's
    ``batch`` of the sample's images: ``[n, 3, H, W]``, or :class:`~lavis.processors.native_image.PatchImages`).

    Records are conversations (``{"messages": [{"role", "content"}]}``, ChatML) or prompt/target
    pairs (``{"prompt", "target"}``, the pretraining formats). Images come from
    ``image_root``/path, or from ``image_bytes[path]`` for records read out of shards; videos
    (``<video>path</video>``) from ``image_root``/path (a file or a directory of frames), through
    ``video_processor``. A record's ``videos`` mapping, written by the builders, is consulted first:
    ``{name: {"frames"?: [paths], "fps"?: float, "frames_fps"?: float}}`` reads the ``<video>name</video>``
    span from those frame files (relative to ``image_root``) and passes ``fps`` / ``frames_fps`` to the
    video processor; a name without ``frames`` is itself the path.
    ``truncate``: cut samples longer than ``max_len`` (see ``ConversationEncoder.truncate``);
    otherwise they are returned whole for the caller to drop.
    """

    def __init__(self, encoder: ConversationEncoder, image_processor: Callable, truncate: bool = True,
                 video_processor: Callable | None = None) -> None:
        self.encoder = encoder
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.truncate = truncate

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        process = self.loader(record)
        # A fixed-size model's spans are known without the images: those a truncation drops are never read.
        images = None if isinstance(self.encoder.num_image_tokens, int) else process
        if "messages" in record:
            enc = self.encoder.encode_messages(record["messages"], images=images)
        else:
            enc = self.encoder.encode_prompt(record["prompt"], record["target"], images=images)
        if self.truncate:
            enc = self.encoder.truncate(enc)
        processed = enc.processed if images is not None else [process(path) for path in enc.images]
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": self.image_processor.batch(processed),
        }

    def loader(self, record: dict[str, Any]) -> Callable[..., Any]:
        """The function ``(path, video=False) -> processed item`` that reads one of ``record``'s images or videos."""
        root = Path(record.get("image_root") or "")
        in_memory = record.get("image_bytes") or {}
        videos = record.get("videos") or {}

        def process(path: str, video: bool = False):
            if video:
                if self.video_processor is None:
                    raise SkipSample("video_unsupported", f"{path}: no video processor (model.video_processor)")
                if path in in_memory:
                    raise SkipSample("video_unsupported", f"{path}: videos are read from files, not from shards")
                entry = videos.get(path) or {}
                frames = entry.get("frames")
                source = self._resolve(root, path) if frames is None else [self._resolve(root, f) for f in frames]
                return self.video_processor(source, **{k: entry[k] for k in ("fps", "frames_fps") if k in entry})
            return self.image_processor(
                load_image(path, in_memory[path]) if path in in_memory else load_image(self._resolve(root, path))
            )

        return process

    @staticmethod
    def _resolve(root: Path, path: str) -> Path:
        if "://" in path:
            raise SkipSample("remote_image", f"image URLs are not fetched: {path} (download it and use a local path)")
        return root / path
