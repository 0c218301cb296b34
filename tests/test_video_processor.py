"""The ``qwen2_vl_video`` processor (Qwen2-VL's native-resolution video): frames sampled as transformers'
``Qwen2VLVideoProcessor.sample_frames`` samples them; patches, grid and seconds per temporal patch equal
to transformers' processor on the same frames (and on its own PyAV decoding of the same file); a frame
list equals the same frames in a file; bad videos are named skips, never a crash.

The videos are tiny (64 x 48, 12-40 frames of a moving square) and written with PyAV in ``tmp_path``:
h264 (libx264) in mp4 and mkv, MPEG-4 part 2 in avi and mp4."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import moving_squares, write_video
from PIL import Image

from lavis.common.config.merging import CONFIG_ROOT
from lavis.common.registry import registry
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIP_MEAN, CLIP_STD
from lavis.processors.native_image import Qwen2VLImageProcessor
from lavis.processors.native_video import NativeVideo, Qwen2VLVideoProcessor, sample_frame_indices

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import video_processing_qwen2_vl as hf_video  # noqa: E402
from transformers.video_utils import VideoMetadata, load_video  # noqa: E402

YAML = CONFIG_ROOT / "processors" / "qwen2_vl_video.yaml"
# transformers resizes with torchvision, as we do (the same kernel on the same 8-bit pixels): only the
# float rounding of the normalisation differs (measured 2.4e-7)
ATOL = 1e-5
SMALL = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 24)  # 64 x 48 frames -> 56 x 56 or so: fast


def decode_all(path: Path) -> np.ndarray:
    """Every frame of a file, as PyAV (and transformers' PyAV reader) decodes it."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def hf_processor(min_pixels: int, max_pixels: int, **kwargs) -> hf_video.Qwen2VLVideoProcessor:
    return hf_video.Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, image_mean=list(CLIP_MEAN),
                                          image_std=list(CLIP_STD), **{"cap_pixels_per_frame": False, **kwargs})


def hf_indices(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> list[int]:
    meta = VideoMetadata(total_num_frames=total, fps=video_fps)
    return hf_processor(3136, 3136 * 4).sample_frames(meta, fps=fps, min_frames=min_frames, max_frames=max_frames,
                                                      temporal_patch_size=2).tolist()


def assert_same(ours: NativeVideo, ref, atol: float = ATOL) -> None:
    assert list(ours.grid) == ref["video_grid_thw"][0].tolist()
    assert ours.patches.dtype == torch.float32 and ours.patches.shape == ref["pixel_values_videos"].shape
    torch.testing.assert_close(ours.patches, ref["pixel_values_videos"], rtol=0, atol=atol)


def test_defaults_are_transformers_and_qwen_vl_utils_defaults():
    ours, ref = Qwen2VLVideoProcessor(), hf_video.Qwen2VLVideoProcessor
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size, ours.min_frames, ours.max_frames) == (
        ref.patch_size, ref.temporal_patch_size, ref.merge_size, ref.min_frames, ref.max_frames) == (14, 2, 2, 4, 768)
    assert (ours.min_pixels, ours.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    assert (ours.min_pixels, ours.max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    assert ours.fps == 2.0 and ours.total_pixels is None  # qwen-vl-utils' FPS; transformers' class has no fps
    assert torch.allclose(ours.mean.flatten(), torch.tensor(ref.image_mean))
    assert torch.allclose(ours.std.flatten(), torch.tensor(ref.image_std))


def test_yaml_builds_the_registered_processor_with_the_defaults():
    """The default YAML, resolved as a config resolves it (its patch sizes follow model.image_processor's, here
    absent: the defaults), builds the registered processor with the class's defaults."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.create({"v": yaml.safe_load(YAML.read_text())}), resolve=True)["v"]
    cls = registry.get("processor", cfg.pop("type"))
    assert cls is Qwen2VLVideoProcessor
    built, default = cls(**cfg), Qwen2VLVideoProcessor()
    assert vars(built).keys() == vars(default).keys()
    for key, value in vars(default).items():
        assert torch.equal(value, vars(built)[key]) if torch.is_tensor(value) else value == vars(built)[key], key
    # every key is commented
    for line in YAML.read_text().splitlines():
        if line and not line.startswith((" ", "#", "type:")):
            assert "#" in line, line


# (total frames, the video's fps, fps, min_frames, max_frames): at fps, sampled up to min_frames, sampled down
# to max_frames, an odd count floored, fewer frames than min_frames, a fractional rate, transformers' arange
# giving one index too many (14 of 17), a long video
SAMPLINGS = [(40, 10, 2.0, 4, 768), (12, 24, 2.0, 4, 768), (40, 10, 2.0, 4, 6), (25, 5, 2.0, 4, 768),
             (3, 30, 2.0, 4, 768), (40, 29.97, 2.0, 4, 768), (17, 1, 0.9, 4, 768), (30, 1, 0.9, 4, 768),
             (9000, 30, 2.0, 4, 768), (100000, 25, 2.0, 4, 768), (48, 24, 1.0, 16, 768), (7, 7, 7.0, 2, 3)]


@pytest.mark.parametrize(("total", "video_fps", "fps", "min_frames", "max_frames"), SAMPLINGS)
def test_sampling_is_transformers(total, video_fps, fps, min_frames, max_frames):
    ours = sample_frame_indices(total, video_fps, fps, min_frames, max_frames, 2)
    ref = hf_indices(total, video_fps, fps, min_frames, max_frames)
    # transformers' float32 arange may end with `total` itself (no such frame): the rest are ours
    assert ours == [i for i in ref if i < total]
    assert len(ours) % 2 == 0 and len(ours) <= max(max_frames, 2) and ours == sorted(set(ours))
    assert all(0 <= i < total for i in ours)
    expected = min(max(total / video_fps * fps, min_frames), math.floor(min(max_frames, total) / 2) * 2, total)
    assert len(ours) == math.floor(expected / 2) * 2


def test_transformers_arange_quirk_and_what_it_would_divide_by_zero():
    assert hf_indices(17, 1, 0.9, 4, 768)[-1] == 17  # 15 indices for 14 frames, the last out of range
    assert sample_frame_indices(17, 1, 0.9, 4, 768, 2) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15]
    with pytest.raises(ZeroDivisionError):  # a one-frame video: transformers samples 0 frames
        hf_indices(1, 30, 2.0, 4, 768)
    assert sample_frame_indices(1, 30, 2.0, 4, 768, 2) == [0]  # ours keeps it (padded to 2 frames)
    assert sample_frame_indices(10, 30, 2.0, 1, 768, 2) == [0, 5]  # count 0 -> one temporal patch


# (frames, rate, codec, container, processor settings)
FILES = [(40, 10, "libx264", "mp4", dict(SMALL)), (12, 24, "libx264", "mp4", dict(SMALL)),
         (40, 10, "mpeg4", "avi", dict(SMALL, max_frames=6)), (17, 1, "mpeg4", "mp4", dict(SMALL, fps=0.9)),
         (25, 5, "libx264", "mp4", dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8)),
         (20, 8, "libx264", "mp4", dict(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28))]


@pytest.mark.parametrize(("n", "rate", "codec", "ext", "settings"), FILES)
def test_file_equals_transformers_pyav_decoding(tmp_path, n, rate, codec, ext, settings):
    path = write_video(tmp_path / f"v.{ext}", moving_squares(n), rate, codec)
    proc = Qwen2VLVideoProcessor(**settings)
    out = proc(path)
    hf = hf_processor(proc.min_pixels, proc.max_pixels)
    sampler = partial(hf.sample_frames, fps=proc.fps, min_frames=proc.min_frames, max_frames=proc.max_frames,
                      temporal_patch_size=2)
    frames, meta = load_video(str(path), backend="pyav", sample_indices_fn=sampler)
    assert_same(out, hf(videos=[frames], do_sample_frames=False, return_tensors="pt"))
    assert out.grid[0] == math.ceil(len(frames) / 2) and len(frames) % 2 == 0
    kept = [i for i in meta.frames_indices.tolist() if i < n]
    assert out.second_per_grid == pytest.approx(2 / (len(kept) / n * rate))
    if len(kept) == len(meta.frames_indices):  # Qwen2.5-VL's second_per_grid_ts (its sampled_fps)
        assert out.second_per_grid == pytest.approx(2 / meta.sampled_fps)
    # the file equals its frames decoded whole, given as a tensor at the file's rate
    decoded = torch.from_numpy(decode_all(path))
    same = proc(decoded, frames_fps=rate)
    assert torch.equal(same.patches, out.patches) and same.grid == out.grid
    assert same.second_per_grid == pytest.approx(out.second_per_grid)


def test_containers_without_a_frame_count_are_counted(tmp_path):
    frames = moving_squares(30)
    proc = Qwen2VLVideoProcessor(**SMALL)
    mp4 = proc(write_video(tmp_path / "v.mp4", frames, 6))
    for name, codec in (("v.mkv", "libx264"), ("v.webm", "libvpx-vp9")):
        path = write_video(tmp_path / name, frames, 6, codec)
        with av.open(str(path)) as container:
            assert container.streams.video[0].frames == 0
        out = proc(path)
        assert out.grid == mp4.grid and out.second_per_grid == pytest.approx(mp4.second_per_grid) == 1.0
        if codec == "libx264":  # the same h264 stream
            assert torch.equal(out.patches, mp4.patches)


@pytest.mark.parametrize("layout", ["thwc", "tchw"])
@pytest.mark.parametrize(("n", "size", "settings"), [
    (6, (64, 48), SMALL), (7, (97, 61), dict(min_pixels=56 * 56, max_pixels=28 * 28 * 30)),
    (4, (50, 120), dict()), (5, (640, 360), dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64))])
def test_decoded_frames_equal_transformers(n, size, settings, layout):
    width, height = size
    frames = torch.from_numpy(np.random.default_rng(n).integers(0, 256, (n, height, width, 3), dtype=np.uint8))
    proc = Qwen2VLVideoProcessor(**settings)
    out = proc(frames if layout == "thwc" else frames.permute(0, 3, 1, 2))
    kept = proc.sample_indices(n, proc.fps)  # frames_fps: None -> at fps: all kept, an odd last one dropped
    assert kept == list(range(n - n % 2))
    assert_same(out, hf_processor(proc.min_pixels, proc.max_pixels)(videos=[frames[kept]], do_sample_frames=False,
                                                                    return_tensors="pt"))
    # transformers' sampled_fps (kept / total * rate): 2 / fps when all are kept, more when one is dropped
    assert out.second_per_grid == pytest.approx(2 / (len(kept) / n * proc.fps))
    assert (out.second_per_grid == 1.0) == (n % 2 == 0)


def test_total_pixels_caps_frames_as_transformers(tmp_path):
    frames = torch.from_numpy(moving_squares(16, 320, 240))
    tokens = 100  # transformers' total budget: int(max_video_tokens * 28 * 28 * 0.9) pixels
    proc = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, total_pixels=int(tokens * 28 * 28 * 0.9))
    out = proc(frames)
    ref = hf_processor(proc.min_pixels, proc.max_pixels, cap_pixels_per_frame=True, max_video_tokens=tokens)(
        videos=[frames], do_sample_frames=False, return_tensors="pt")
    assert_same(out, ref)
    assert out.grid[1] * out.grid[2] * 14 * 14 <= proc.total_pixels * 2 // 16
    assert out.grid != Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)(frames).grid


def test_frame_list_equals_file_and_tensor(tmp_path):
    original = moving_squares(24)
    path = write_video(tmp_path / "v.mp4", original, 12)
    decoded = decode_all(path)
    paths = []
    for i, frame in enumerate(decoded):
        paths.append(tmp_path / f"frame_{i:03d}.png")
        Image.fromarray(frame).save(paths[-1])
    proc = Qwen2VLVideoProcessor(**SMALL)
    from_file = proc(path)
    # the file's frames as images, at the file's rate: the same as the file, exactly
    from_list = proc([str(p) for p in paths], frames_fps=12)
    assert torch.equal(from_list.patches, from_file.patches) and from_list.grid == from_file.grid == (2, 4, 4)
    assert from_list.second_per_grid == from_file.second_per_grid == 1.0
    # a list of already sampled frames (frames_fps: fps) equals them as a tensor or as PIL images, exactly
    every = proc(paths)
    assert every.grid == (12, 4, 4) and every.second_per_grid == 1.0
    assert torch.equal(every.patches, proc(torch.from_numpy(decoded)).patches)
    assert torch.equal(every.patches, proc([Image.fromarray(f) for f in decoded]).patches)
    # and the original frames, before the lossy encoding, are within the codec's error
    clean = proc(torch.from_numpy(original), frames_fps=12)
    assert clean.grid == from_file.grid
    assert (clean.patches - from_file.patches).abs().mean() < 0.1  # normalised units; measured ~0.03


def test_one_frame_is_the_image_processor(tmp_path):
    image = Image.fromarray(moving_squares(1, 97, 61)[0])
    video = Qwen2VLVideoProcessor(**SMALL)(torch.from_numpy(np.array(image))[None])
    picture = Qwen2VLImageProcessor(**SMALL)(image)
    assert video.grid == picture.grid and torch.equal(video.patches, picture.patches)


def test_long_video_is_sampled_down(tmp_path):
    path = write_video(tmp_path / "long.mp4", moving_squares(40), 10)  # 4 s: 8 frames at 2 fps
    out = Qwen2VLVideoProcessor(**SMALL, max_frames=5)(path)
    assert out.grid[0] == 2 and out.second_per_grid == pytest.approx(2 / (4 / 40 * 10))
    assert Qwen2VLVideoProcessor(**SMALL)(path).grid[0] == 4


def skip_reason(proc: Qwen2VLVideoProcessor, video) -> str:
    with pytest.raises(SkipSample) as info:
        proc(video)
    return info.value.reason


def test_bad_videos_are_named_skips(tmp_path):
    proc = Qwen2VLVideoProcessor(**SMALL)
    frames = moving_squares(40)
    # missing: the file, or a frame of a list
    assert skip_reason(proc, tmp_path / "nowhere.mp4") == "missing_video"
    paths = []
    for i, frame in enumerate(frames[:6]):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(frame).save(paths[-1])
    assert skip_reason(proc, [*paths[:3], tmp_path / "gone.png", *paths[4:]]) == "missing_video"
    # corrupt: not a video, a frame that is not an image, truncated files (the index at the end, and
    # a file whose index comes first: it ends early, or fails to decode)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    assert skip_reason(proc, tmp_path / "noise.mp4") == "corrupt_video"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert skip_reason(proc, [*paths[:3], tmp_path / "bad.png", *paths[4:]]) == "corrupt_video"
    whole = write_video(tmp_path / "whole.mp4", frames, 10).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    assert skip_reason(proc, tmp_path / "cut.mp4") == "corrupt_video"
    for codec in ("mpeg4", "libx264"):
        fast = write_video(tmp_path / f"fast_{codec}.mp4", frames, 10, codec, {"movflags": "faststart"}).read_bytes()
        (tmp_path / "cut_fast.mp4").write_bytes(fast[:len(fast) * 6 // 10])
        assert skip_reason(proc, tmp_path / "cut_fast.mp4") == "corrupt_video", codec
    # empty: no bytes, no video stream (an mp4 written without frames), a stream of no frames, no frames
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert skip_reason(proc, tmp_path / "zero.mp4") == "empty_video"
    for name, codec in (("none.mp4", "libx264"), ("none.avi", "mpeg4")):
        with av.open(str(tmp_path / name), "w") as container:
            stream = container.add_stream(codec, rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()
        assert skip_reason(proc, tmp_path / name) == "empty_video", name
    assert skip_reason(proc, []) == "empty_video"
    assert skip_reason(proc, torch.zeros(0, 48, 64, 3, dtype=torch.uint8)) == "empty_video"
    # a frame 1 x 300: refused as transformers refuses it (over 200:1)
    assert skip_reason(proc, torch.zeros(2, 1, 300, 3, dtype=torch.uint8)) == "bad_video_size"
    with pytest.raises(ValueError, match="uint8"):  # a programming error, not a bad sample
        proc(torch.zeros(2, 48, 64, 3))
