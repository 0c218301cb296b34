"""Image processor: load, resize to the encoder's size, normalise with CLIP's mean/std."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lavis.common.registry import registry
from lavis.processors.errors import SkipSample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Open an image (a file, or ``data`` read from a shard) as RGB.

    A missing or unreadable image raises :class:`SkipSample`.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise SkipSample("missing_image", f"image not found: {path}")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkipSample("corrupt_image", f"cannot read image {path}: {err}") from None


class ImageTooLarge(ValueError):
    """A picture with more pixels than allowed (refused before its pixels are decoded)."""


def open_bounded_image(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    """A picture from untrusted input (a file or its bytes) as RGB, for serving: its size is read
    from the header and a picture over ``max_pixels`` is refused undecoded (:class:`ImageTooLarge`,
    with its size); one PIL cannot read is a ValueError with PIL's reason."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{width} x {height} pixels (at most {max_pixels:,} pixels)")
            return to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise ValueError(str(err)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL opens -> 8-bit RGB with the image's contrast.

    PIL's own ``convert("RGB")`` clips 16-bit and 32-bit samples to 255 (a 16-bit grayscale PNG turns
    white), so those are scaled first: integer samples by their bit depth (16 bits unless a value needs
    more, then by the maximum), float samples from [0, 1] (or clipped to [0, 255] when larger). Alpha
    is dropped, as ``convert("RGB")`` (and Qwen-VL's loader) does.
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if img.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1.0 if top <= 255 else 255.0 / (65535.0 if top <= 65535 else top)
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


@registry.register("processor", "clip_image")
class CLIPImageProcessor:
    """Resize to ``image_size`` x ``image_size`` (bicubic, as Qwen-VL) and normalise."""

    def __init__(
        self,
        image_size: int,
        mean: list[float] = list(CLIP_MEAN),
        std: list[float] = list(CLIP_STD),
    ) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float tensor [3, image_size, image_size]."""
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float().div_(255.0) - self.mean) / self.std
