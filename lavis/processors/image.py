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

    A missing or unreadable image raises :class:`SkipSample` (``missing_image``, ``corrupt_image``), and so
    does one over Pillow's decompression-bomb limit (``image_too_large``, naming its size): Pillow refuses
    one over twice ``PIL.Image.MAX_IMAGE_PIXELS`` and only warns about one over the limit itself, which
    would then be decoded whole. The picture's EXIF orientation is kept (see :func:`to_rgb`) for the image
    processor to apply.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise SkipSample("missing_image", f"image not found: {path}")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            check_pixel_limit(img, path)
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise SkipSample("image_too_large", f"image too large: {path}: {err} {RAISE_LIMIT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkipSample("corrupt_image", f"cannot read image {path}: {err}") from None


RAISE_LIMIT = "(Pillow's decompression-bomb limit: shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS)"


def check_pixel_limit(img: Image.Image, path: str | Path) -> None:
    """SkipSample ``image_too_large`` when ``img`` (opened, not decoded) has more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit), where Pillow itself only warns."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise SkipSample("image_too_large", f"image too large: {path}: {width} x {height} = {width * height:,} pixels, "
                                            f"over {limit:,} {RAISE_LIMIT}")


class ImageTooLarge(ValueError):
    """A picture with more pixels than allowed (refused before its pixels are decoded)."""


def open_bounded_image(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    """A picture from untrusted input (a file or its bytes) as RGB, for serving: its size is read
    from the header and a picture over ``max_pixels`` is refused undecoded (:class:`ImageTooLarge`,
    with its size), and so is one Pillow refuses as a decompression bomb; one PIL cannot read is a
    ValueError with PIL's reason."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{width} x {height} pixels (at most {max_pixels:,} pixels)")
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning: when made an error
        raise ImageTooLarge(f"{err} (at most {max_pixels:,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(str(err)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL opens -> 8-bit RGB with the image's contrast.

    PIL's own ``convert("RGB")`` clips 16-bit and 32-bit samples to 255 (a 16-bit grayscale PNG turns
    white), so those are scaled first: integer samples by their bit depth (16 bits unless a value needs
    more, then by the maximum), float samples from [0, 1] (or clipped to [0, 255] when larger). Alpha
    is dropped, as ``convert("RGB")`` (and Qwen-VL's loader) does. The pixels stay as stored; the EXIF
    orientation (2-8, of phone photos) is recorded in ``info["exif_orientation"]`` for the image processor
    (``exif_transpose``) to apply.
    """
    orientation = exif_orientation(img)
    rgb = _to_rgb(img)
    if orientation != 1:
        rgb.info[ORIENTATION_INFO] = orientation
    return rgb


ORIENTATION_INFO = "exif_orientation"
EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that shows the picture upright (as PIL.ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of a picture (1 = upright, as stored): the one :func:`to_rgb` recorded, else
    the picture's own EXIF tag; 1 when there is none or the EXIF block cannot be read."""
    recorded = img.info.get(ORIENTATION_INFO)
    if recorded is not None:
        return int(recorded)
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block: the pixels are still good)
        return 1
    return value if value in ORIENTATION_TRANSPOSE else 1


def exif_transpose(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation (``PIL.ImageOps.exif_transpose``'s pixels; it works
    on pictures from :func:`load_image` too, whose EXIF block the RGB conversion may have dropped)."""
    orientation = exif_orientation(img)
    if orientation == 1:
        return img
    upright = img.transpose(ORIENTATION_TRANSPOSE[orientation])
    upright.info.pop(ORIENTATION_INFO, None)
    return upright


def _to_rgb(img: Image.Image) -> Image.Image:
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
    """Turn upright by the EXIF orientation (``exif_transpose``), resize to ``image_size`` x ``image_size``
    (bicubic, as Qwen-VL) and normalise.

    ``exif_transpose: false`` keeps Qwen-VL's own behaviour: its loader (``Image.open(...).convert("RGB")``)
    ignores the orientation, so a phone photo reaches the model as stored, often on its side.
    """

    def __init__(
        self,
        image_size: int,
        mean: list[float] | tuple[float, ...] = CLIP_MEAN,
        std: list[float] | tuple[float, ...] = CLIP_STD,
        exif_transpose: bool = True,
    ) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.exif_transpose = exif_transpose

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float tensor [3, image_size, image_size]."""
        if self.exif_transpose:
            image = exif_transpose(image)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float().div_(255.0) - self.mean) / self.std

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Processed images of a sample, in order -> ``[n, 3, image_size, image_size]`` (n may be 0)."""
        size = self.image_size
        return torch.stack(images) if images else torch.zeros(0, 3, size, size)
