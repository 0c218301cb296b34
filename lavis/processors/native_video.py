"""Native-resolution video processor (Qwen2-VL's and Qwen2.5-VL's): frames sampled at ``fps``, each resized
as a native-resolution image, grouped by the ViT's temporal patch into flattened patches with the video's
grid ``(t, h, w)`` and the seconds one temporal patch spans (Qwen2.5-VL's ``second_per_grid_ts``).

Videos are decoded with PyAV (``av``, imported when a file is read), in the data workers."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lavis.common.registry import registry
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIP_MEAN, CLIP_STD, exif_transpose, load_image
from lavis.processors.native_image import check_processor_sizes, smart_resize

# A video file, a directory of its frames, its frames as image files (or PIL images), or decoded uint8 frames
# [T, H, W, 3] / [T, 3, H, W].
VideoInput = str | Path | Sequence[str | Path | Image.Image] | torch.Tensor | np.ndarray
# The files of a directory of frames that are frames (case ignored); the others (a .txt, .DS_Store) are not read.
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def natural_key(name: str) -> list[str | int]:
    """Sort key putting ``frame_2.jpg`` before ``frame_10.jpg`` (digit runs compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(directory: Path) -> list[Path]:
    """The frames of a directory: its image files (:data:`FRAME_SUFFIXES`, hidden files left out) in natural
    order (:func:`natural_key`), so ``1.jpg, 2.jpg, 10.jpg`` and ``0001.jpg, 0002.jpg`` are both in time order."""
    files = [p for p in directory.iterdir()
             if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


class NativeVideo(NamedTuple):
    """One processed video: ``patches`` ``[t*h*w, channels*temporal_patch_size*patch_size**2]`` (float32) in
    the order the patch merger expects, its ``grid`` ``(t, h, w)`` in patches (``t`` temporal patches of
    ``temporal_patch_size`` frames), and ``second_per_grid``: the seconds of video one temporal patch spans
    (``temporal_patch_size`` / the rate the frames were sampled at; Qwen2.5-VL's ``second_per_grid_ts``, for
    its time-aligned M-RoPE positions)."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    second_per_grid: float


def sample_frame_indices(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int,
                         temporal_patch_size: int) -> list[int]:
    """The frames (indices in ``[0, total_frames)``) kept of a video of ``total_frames`` frames at ``video_fps``
    when sampling ``fps`` frames a second: transformers' ``Qwen2VLVideoProcessor.sample_frames``, reproduced
    exactly. The count is ``total_frames / video_fps * fps`` clamped to ``[min_frames, max_frames]`` (and to
    the video's frames, ``max_frames`` first floored to a multiple of ``temporal_patch_size``), then floored to
    a multiple of ``temporal_patch_size``; the indices are ``torch.arange(0, total, total / count).int()``.

    That arange (float32, its length ``ceil(total / step)`` in float64) has one element too many in about 4%
    of (total, count) pairs, always ``total_frames`` itself (e.g. 14 of 17 frames: ``[0, 1, 2, 3, 4, 6, ...,
    15, 17]``): it is dropped here. transformers' PyAV reader drops it the same way (no frame has that
    index), so the frames are the same; its tensor path would fail indexing with it.
    Where transformers divides by zero (a count of 0: one frame, or ``min_frames`` < ``temporal_patch_size``
    on a short video), the count is ``min(total_frames, temporal_patch_size)``: a one-frame video is kept."""
    if total_frames < 1:
        raise ValueError(f"no frames to sample: total_frames={total_frames}")
    max_frames = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
    count = total_frames / video_fps * fps
    count = min(max(count, min_frames), max_frames, total_frames)
    count = math.floor(count / temporal_patch_size) * temporal_patch_size
    if count == 0:
        count = min(total_frames, temporal_patch_size)
    return [i for i in torch.arange(0, total_frames, total_frames / count).int().tolist() if i < total_frames]


@registry.register("processor", "qwen2_vl_video")
class Qwen2VLVideoProcessor:
    """Qwen2-VL's video processor, per video (defaults: qwen-vl-utils' and transformers'
    ``Qwen2VLVideoProcessor``'s):

    - input: a video file (any container PyAV reads), a list of its frames as image files (LLaVA-Video's
      and Qwen2-VL's data form; PIL images are taken too), a directory of them (:func:`frame_files`: its
      images in natural order), or decoded uint8 frames ``[T, H, W, 3]`` / ``[T, 3, H, W]`` (channels
      last when the last axis is 3). A file's rate is its stream's average rate (as transformers reads
      it); frames are taken to be at ``frames_fps`` frames a second (the call's argument, else the key;
      None: at ``fps``, i.e. already sampled, so every frame is kept up to ``max_frames``, an odd last
      one dropped by the rule below as it would be in a file). A call's ``fps`` (a record's per-video
      rate) replaces the key's for that video.
    - sampling: :func:`sample_frame_indices` (transformers' rule, exactly), ``fps`` frames a second,
      ``min_frames`` to ``max_frames``, a multiple of ``temporal_patch_size``. Only the kept frames are
      converted and resized (a file is decoded up to its last kept frame and the others dropped; of a frame
      list only the kept images are read).
    - every frame is resized to :func:`~lavis.processors.native_image.smart_resize`'s size for the first
      frame (per-frame ``min_pixels``/``max_pixels``; with ``total_pixels``, ``max_pixels`` is also capped
      at an even share of it per frame, floored at ``1.05 * min_pixels``, as qwen-vl-utils and transformers'
      ``cap_pixels_per_frame``), bicubic with antialiasing on the 8-bit pixels as transformers does;
      rescaled to [0, 1], normalised with ``image_mean``/``image_std``; the frame count padded to a multiple
      of ``temporal_patch_size`` by repeating the last frame; cut into ``patch_size`` patches of
      ``temporal_patch_size`` frames, ordered temporal patch by temporal patch, then window by window (each
      ``merge_size`` x ``merge_size`` window contiguous, windows row-major), each patch flattened as
      (channel, frame, row, column). Returns a :class:`NativeVideo`.

    Bad input is a :class:`SkipSample`: ``missing_video`` (the file or directory, or any frame file of a
    list, kept or not, is not there), ``corrupt_video`` (PyAV cannot open or decode it, it ends before its
    last kept frame, or a kept frame image cannot be read), ``empty_video`` (no frames, no video stream, an
    empty file, a directory without frame images), and ``bad_video_size`` (frames whose longer side is over
    200 times the shorter one). A video longer than ``max_frames`` allows is sampled down, never refused.
    """

    native_resolution = True

    def __init__(
        self,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        fps: float = 2.0,
        min_frames: int = 4,
        max_frames: int = 768,
        min_pixels: int = 128 * 28 * 28,
        max_pixels: int = 768 * 28 * 28,
        total_pixels: int | None = None,
        frames_fps: float | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        check_processor_sizes("qwen2_vl_video", min_pixels, max_pixels, patch_size=patch_size,
                              temporal_patch_size=temporal_patch_size, merge_size=merge_size, min_frames=min_frames,
                              max_frames=max_frames)
        for key, value in (("fps", fps), ("frames_fps", frames_fps), ("total_pixels", total_pixels)):
            if value is not None and not value > 0:
                raise ValueError(f"qwen2_vl_video: {key} must be positive, got {value}")
        if min_frames > max_frames:
            raise ValueError(f"qwen2_vl_video: min_frames ({min_frames}) > max_frames ({max_frames})")
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.fps = float(fps)
        self.min_frames = int(min_frames)
        self.max_frames = int(max_frames)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.total_pixels = None if total_pixels is None else int(total_pixels)
        self.frames_fps = None if frames_fps is None else float(frames_fps)
        self.mean = torch.tensor(list(image_mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(image_std), dtype=torch.float32).view(-1, 1, 1)

    @property
    def factor(self) -> int:
        """Each side of a resized frame is a multiple of this (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal_patch_size x patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def num_video_tokens(self, grid: Sequence[int] | torch.Tensor) -> int:
        """The LLM tokens (``<|video_pad|>``) of a video with this grid: ``t*h*w // merge_size**2``."""
        t, h, w = (int(x) for x in grid)
        return t * h * w // self.merge_size**2

    def sample_indices(self, total_frames: int, video_fps: float, fps: float | None = None) -> list[int]:
        """The frames kept of ``total_frames`` at ``video_fps``, sampled at ``fps`` (default: the key's;
        :func:`sample_frame_indices`)."""
        return sample_frame_indices(total_frames, video_fps, fps or self.fps, self.min_frames, self.max_frames,
                                    self.temporal_patch_size)

    def frame_max_pixels(self, num_frames: int) -> int:
        """The most pixels a frame of a video of ``num_frames`` sampled frames is resized to: ``max_pixels``,
        and with ``total_pixels`` at most ``total_pixels * temporal_patch_size // num_frames`` but at least
        ``int(1.05 * min_pixels)`` (transformers' ``cap_pixels_per_frame`` with ``total_pixels`` =
        ``int(max_video_tokens * 28 * 28 * 0.9)``; qwen-vl-utils' ``VIDEO_TOTAL_PIXELS``)."""
        if self.total_pixels is None:
            return self.max_pixels
        share = self.total_pixels * self.temporal_patch_size // max(num_frames, 1)
        return max(min(self.max_pixels, share), int(self.min_pixels * 1.05))

    def target_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        """The (height, width) the ``height`` x ``width`` frames of a video of ``num_frames`` sampled frames
        are resized to; frames of an extreme shape are refused (SkipSample ``bad_video_size``)."""
        try:
            return smart_resize(height, width, self.factor, self.min_pixels, self.frame_max_pixels(num_frames))
        except SkipSample as err:
            raise SkipSample("bad_video_size", f"video frames: {err}") from None

    def __call__(self, video: VideoInput, frames_fps: float | None = None, fps: float | None = None) -> NativeVideo:
        """A video file, a directory of frames, a frame list, or decoded uint8 frames -> :class:`NativeVideo`.
        ``frames_fps``: the rate of a directory's, list's or tensor's frames (default: the ``frames_fps`` key,
        else ``fps``); ``fps``: the rate to sample at (default: the key's)."""
        fps = fps or self.fps
        if isinstance(video, (str, Path)) and not Path(video).is_dir():
            frames, indices, total, rate = self._read_file(Path(video), fps)
        else:
            rate = frames_fps or self.frames_fps or fps
            if isinstance(video, (torch.Tensor, np.ndarray)):
                frames, indices, total = self._sample_tensor(torch.as_tensor(video), rate, fps)
            elif isinstance(video, (str, Path)):
                frames_in = frame_files(Path(video))
                if not frames_in:
                    raise SkipSample("empty_video", f"no frame images ({', '.join(FRAME_SUFFIXES)}) in directory {video}")
                frames, indices, total = self._read_frame_list(frames_in, rate, fps)
            else:
                frames, indices, total = self._read_frame_list(list(video), rate, fps)
        sampled_fps = len(indices) / total * rate  # transformers' VideoMetadata.sampled_fps
        pixels = (frames.float() / 255.0 - self.mean) / self.std
        grid_t = -(-len(indices) // self.temporal_patch_size)
        grid = (grid_t, pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return NativeVideo(self.patchify(pixels), grid, self.temporal_patch_size / sampled_fps)

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``[T, C, H, W]`` (H, W multiples of :attr:`factor`) -> ``[ceil(T/tp) * H/p * W/p, C * tp * p * p]``
        (tp: ``temporal_patch_size``): the frames padded to a multiple of tp by repeating the last; temporal
        patches in order, windows row-major within each, patches row-major within a window."""
        frames_in, channels, height, width = frames.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if pad := -frames_in % tp:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        grid_t, rows, cols = frames.shape[0] // tp, height // (p * m), width // (p * m)
        # axes: temporal patch, frame in it, channel, window row, row in window, pixel row, window column,
        # column in window, pixel column
        x = frames.reshape(grid_t, tp, channels, rows, m, p, cols, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, window row, window column, row in, column in, c, frame, py, px
        return x.reshape(grid_t * rows * cols * m * m, channels * tp * p * p).contiguous()

    def _resized(self, frames: Iterable[torch.Tensor], count: int) -> torch.Tensor:
        """``count`` uint8 frames ``[3, H, W]`` -> ``[count, 3, h, w]``, each resized to the first frame's
        :meth:`target_size` (a frame of another size too: frames of a list may differ)."""
        out = None
        for i, frame in enumerate(frames):
            if out is None:
                out = torch.empty(count, 3, *self.target_size(frame.shape[1], frame.shape[2], count), dtype=torch.uint8)
            if frame.shape[1:] != out.shape[2:]:
                # torch's antialiased bicubic on 8-bit pixels (rounded, clamped): torchvision's resize
                frame = F.interpolate(frame[None], size=tuple(out.shape[2:]), mode="bicubic", align_corners=False,
                                      antialias=True)[0]
            out[i] = frame
        assert out is not None
        return out

    def _sample_tensor(self, frames: torch.Tensor, rate: float, fps: float) -> tuple[torch.Tensor, list[int], int]:
        if frames.dtype != torch.uint8 or frames.dim() != 4 or 3 not in (frames.shape[1], frames.shape[-1]):
            raise ValueError(f"qwen2_vl_video: decoded frames must be uint8 [T, H, W, 3] or [T, 3, H, W], "
                             f"got {frames.dtype} {list(frames.shape)}")
        if frames.shape[-1] == 3:
            frames = frames.permute(0, 3, 1, 2)
        if frames.shape[0] == 0:
            raise SkipSample("empty_video", "a video of no frames")
        indices = self.sample_indices(frames.shape[0], rate, fps)
        return self._resized((frames[i] for i in indices), len(indices)), indices, frames.shape[0]

    def _read_frame_list(self, paths: list, rate: float, fps: float) -> tuple[torch.Tensor, list[int], int]:
        if not paths:
            raise SkipSample("empty_video", "a frame list of no frames")
        # every file checked, kept or not: a list with a gap would put its frames at the wrong times
        gap = next((i for i, p in enumerate(paths) if not isinstance(p, Image.Image) and not Path(p).is_file()), None)
        if gap is not None:
            raise SkipSample("missing_video", f"video frame {gap} of {len(paths)} not found: {paths[gap]}")
        indices = self.sample_indices(len(paths), rate, fps)
        return self._resized((self._load_frame(paths[i]) for i in indices), len(indices)), indices, len(paths)

    @staticmethod
    def _load_frame(frame: str | Path | Image.Image) -> torch.Tensor:
        """One frame of a list, upright by its EXIF orientation, as uint8 ``[3, H, W]``."""
        if isinstance(frame, Image.Image):
            image = frame.convert("RGB") if frame.mode != "RGB" else frame
        else:
            try:
                image = load_image(frame)
            except SkipSample as err:
                reason = {"missing_image": "missing_video", "corrupt_image": "corrupt_video"}.get(err.reason, err.reason)
                raise SkipSample(reason, f"video frame: {err}") from None
        image = exif_transpose(image)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def _read_file(self, path: Path, fps: float) -> tuple[torch.Tensor, list[int], int, float]:
        """Decode the kept frames of a video file: (frames ``[n, 3, h, w]`` resized, their indices, the
        video's frame count, its rate)."""
        import av  # PyAV: only where a video file is read

        if not path.is_file():
            raise SkipSample("missing_video", f"video not found: {path}")
        if path.stat().st_size == 0:
            raise SkipSample("empty_video", f"empty video file: {path}")
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise SkipSample("empty_video", f"no video stream in {path}")
                stream = container.streams.video[0]
                # mp4/avi/mov give their frame count; mkv/webm do not: count the stream's packets then
                total = stream.frames or _count_packets(path)
                if total < 1:
                    raise SkipSample("empty_video", f"no frames in {path}")
                rate = stream.average_rate or stream.guessed_rate
                if rate:
                    rate = float(rate)
                elif container.duration:  # in microseconds
                    rate = total / (container.duration / 1e6)
                else:
                    rate = fps  # no rate known: take the frames as already at fps
                indices = self.sample_indices(total, rate, fps)
                return self._resized(_decode_frames(container, stream, indices, path), len(indices)), indices, total, rate
        except SkipSample:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as err:
            raise SkipSample("corrupt_video", f"cannot decode video {path}: {err}") from None


def _decode_frames(container, stream, indices: list[int], path: Path) -> Iterable[torch.Tensor]:
    """The frames at ``indices`` (increasing) of a PyAV ``stream``, as uint8 ``[3, H, W]``: decoded up to the
    last of them, the others dropped unconverted. A stream that ends before it is ``corrupt_video``."""
    wanted, decoded = Counter(indices), 0
    for frame in container.decode(stream):
        if decoded in wanted:
            pixels = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            for _ in range(wanted[decoded]):
                yield pixels
        decoded += 1
        if decoded > indices[-1]:
            return
    raise SkipSample("corrupt_video", f"video {path} ends after {decoded} of its {stream.frames or 'counted'} frames "
                                      f"(truncated?)")


def _count_packets(path: Path) -> int:
    """The packets (one a frame) of the first video stream of a container that does not give its frame count."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
