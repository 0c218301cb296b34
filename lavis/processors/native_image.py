"""Native-resolution image processor (Qwen2-VL's): an image keeps its aspect ratio and about its own
size, and becomes a variable number of flattened patches with its grid ``(t, h, w)``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lavis.common.registry import registry
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIP_MEAN, CLIP_STD, exif_transpose

MAX_ASPECT_RATIO = 200  # Qwen2-VL refuses a longer side over 200 times the shorter one


class NativeImage(NamedTuple):
    """One processed image: ``patches`` ``[t*h*w, channels*temporal_patch_size*patch_size**2]``
    (float32) in the order the patch merger expects, and its ``grid`` ``(t, h, w)`` in patches."""

    patches: torch.Tensor
    grid: tuple[int, int, int]


class PatchImages(NamedTuple):
    """Native-resolution images and videos of a sample or a batch, as the model takes them (``pixel_values``):
    every item's patches concatenated in the order they appear in the text (``patches`` ``[N, D]``), each
    item's grid (``grid_thw`` ``[n, 3]``, long) and, for videos, the seconds one temporal patch spans
    (``second_per_grid`` ``[n]``, float32; 0 for an image; None: images only). Collate concatenates them
    with :func:`cat_images`."""

    patches: torch.Tensor
    grid_thw: torch.Tensor
    second_per_grid: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return int(self.grid_thw.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> PatchImages:
        """On ``device``; ``dtype`` applies to the patches only (the grids stay long)."""
        seconds = None if self.second_per_grid is None else self.second_per_grid.to(device=device, non_blocking=non_blocking)
        return PatchImages(self.patches.to(device=device, dtype=dtype, non_blocking=non_blocking),
                           self.grid_thw.to(device=device, non_blocking=non_blocking), seconds)

    @property
    def seconds(self) -> torch.Tensor:
        """``second_per_grid``, zeros (images) when absent."""
        if self.second_per_grid is None:
            return torch.zeros(self.num_images, dtype=torch.float32, device=self.grid_thw.device)
        return self.second_per_grid


def cat_images(parts: Sequence[torch.Tensor | PatchImages]) -> torch.Tensor | PatchImages:
    """The images of several samples, in order, as one model input: fixed-size images ``[n, 3, H, W]``
    stacked along the first axis, native-resolution ones (:class:`PatchImages`) patch lists and grids
    concatenated."""
    if parts and isinstance(parts[0], PatchImages):
        videos = any(p.second_per_grid is not None for p in parts)
        return PatchImages(torch.cat([p.patches for p in parts]), torch.cat([p.grid_thw for p in parts]),
                           torch.cat([p.seconds for p in parts]) if videos else None)
    return torch.cat(list(parts))


def num_images(pixel_values: torch.Tensor | PatchImages | None) -> int:
    """How many images a model input holds."""
    if pixel_values is None:
        return 0
    return pixel_values.num_images if isinstance(pixel_values, PatchImages) else int(pixel_values.shape[0])


def check_processor_sizes(owner: str, min_pixels: int, max_pixels: int, **positive: int) -> None:
    """A native processor's sizes: each of ``positive`` a positive integer, ``min_pixels <= max_pixels``;
    a ValueError naming ``owner`` and the key otherwise."""
    for key, value in {**positive, "min_pixels": min_pixels, "max_pixels": max_pixels}.items():
        if int(value) < 1:
            raise ValueError(f"{owner}: {key} must be a positive integer, got {value}")
    if min_pixels > max_pixels:
        raise ValueError(f"{owner}: min_pixels ({min_pixels}) > max_pixels ({max_pixels})")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size for a ``height`` x ``width`` picture: each side a multiple of ``factor``
    (the side rounded to the nearest multiple), then, when the area is over ``max_pixels`` (under
    ``min_pixels``), both sides scaled down (up) by the same ratio and floored (ceiled) to multiples of
    ``factor``, at least ``factor`` each. An empty picture, or one whose longer side is over 200 times
    its shorter one, is refused (SkipSample ``bad_image_size``), as transformers refuses it."""
    if height < 1 or width < 1:
        raise SkipSample("bad_image_size", f"empty image: {width} x {height} pixels")
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise SkipSample("bad_image_size", f"image {width} x {height}: the longer side is over "
                                           f"{MAX_ASPECT_RATIO} times the shorter one")
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


@registry.register("processor", "qwen2_vl_image")
class Qwen2VLImageProcessor:
    """Qwen2-VL's image processor, per image: turn upright by the EXIF orientation (``exif_transpose``,
    as ``clip_image``), resize to :func:`smart_resize`'s size (bicubic with antialiasing on the 8-bit
    pixels, as transformers' default, torchvision-based ``Qwen2VLImageProcessor``), rescale to [0, 1],
    normalise with ``image_mean``/``image_std``, repeat the picture to ``temporal_patch_size`` frames and
    cut it into ``patch_size`` patches, ordered window by window (each ``merge_size`` x ``merge_size``
    window of patches contiguous, windows row-major), each patch flattened as (channel, frame, row,
    column). Returns a :class:`NativeImage` (patches and grid ``(1, h, w)``).

    :meth:`batch` gathers a sample's images into the model's input (:class:`PatchImages`); the tokens
    an image takes in the text are the model's to say (``VisionLanguageModel.image_tokens``: with
    ``patch_merger``, :meth:`num_image_tokens`).
    """

    native_resolution = True

    def __init__(
        self,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        exif_transpose: bool = True,
    ) -> None:
        check_processor_sizes("qwen2_vl_image", min_pixels, max_pixels, patch_size=patch_size,
                              temporal_patch_size=temporal_patch_size, merge_size=merge_size)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.mean = torch.tensor(list(image_mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(image_std), dtype=torch.float32).view(-1, 1, 1)
        self.exif_transpose = exif_transpose

    @property
    def factor(self) -> int:
        """Each side of a resized image is a multiple of this (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) a ``height`` x ``width`` picture is resized to."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal_patch_size x patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def batch(self, images: list) -> PatchImages:
        """Processed images (and videos: ``NativeVideo``) of a sample, in order -> one :class:`PatchImages`
        (possibly of none)."""
        if not images:
            return PatchImages(torch.zeros(0, self.patch_dim), torch.zeros(0, 3, dtype=torch.long))
        seconds = [float(getattr(item, "second_per_grid", 0.0)) for item in images]
        return PatchImages(torch.cat([item.patches for item in images]), torch.tensor([item.grid for item in images], dtype=torch.long),
                           torch.tensor(seconds, dtype=torch.float32) if any(seconds) else None)

    def num_image_tokens(self, grid: Sequence[int] | torch.Tensor) -> int:
        """The LLM tokens (``<|image_pad|>``) of an image with this grid: ``t*h*w // merge_size**2``."""
        t, h, w = (int(x) for x in grid)
        return t * h * w // self.merge_size**2

    def __call__(self, image: Image.Image) -> NativeImage:
        """PIL image -> :class:`NativeImage`."""
        if self.exif_transpose:
            image = exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        new_h, new_w = self.target_size(height, width)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        if (new_h, new_w) != (height, width):
            # torch's antialiased bicubic on 8-bit pixels (rounded, clamped): torchvision's resize
            pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                                   antialias=True)[0]
        pixels = (pixels.float() / 255.0 - self.mean) / self.std
        return NativeImage(self.patchify(pixels), (1, new_h // self.patch_size, new_w // self.patch_size))

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[C, H, W]`` (H, W multiples of :attr:`factor`) -> ``[H/p * W/p, C * T * p * p]``: windows
        row-major, patches row-major within a window, each patch repeated over the T frames."""
        channels, height, width = pixels.shape
        p, m, frames = self.patch_size, self.merge_size, self.temporal_patch_size
        rows, cols = height // (p * m), width // (p * m)
        # axes: channel, window row, row in window, pixel row, window column, column in window, pixel column
        x = pixels.reshape(channels, rows, m, p, cols, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)  # window row, window column, row in, column in, channel, py, px
        x = x.unsqueeze(5).expand(rows, cols, m, m, channels, frames, p, p)
        return x.reshape(rows * cols * m * m, channels * frames * p * p).contiguous()
