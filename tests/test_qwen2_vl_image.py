"""The ``qwen2_vl_image`` processor (Qwen2-VL's native resolution): grid, patches and token count equal
to transformers' own Qwen2-VL image processor and processor; bad sizes are skipped, never a crash;
EXIF orientation applied."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

from lavis.common.config.merging import CONFIG_ROOT
from lavis.common.registry import registry
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIP_MEAN, CLIP_STD, load_image
from lavis.processors.native_image import NativeImage, Qwen2VLImageProcessor, smart_resize

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402
from transformers.models.qwen2_vl import image_processing_qwen2_vl as hf_fast  # noqa: E402
from transformers.models.qwen2_vl import video_processing_qwen2_vl as hf_video  # noqa: E402

YAML = CONFIG_ROOT / "processors" / "qwen2_vl_image.yaml"
DEFAULT_MAX = 28 * 28 * 1280
# (width, height), max_pixels: square, landscape, tall and thin, below min_pixels, above a small max_pixels,
# a single pixel
SIZES = [((224, 224), DEFAULT_MAX), ((640, 480), DEFAULT_MAX), ((97, 1333), DEFAULT_MAX), ((30, 30), DEFAULT_MAX),
         ((3000, 2000), 28 * 28 * 256), ((1, 1), DEFAULT_MAX)]
# transformers' default (torchvision) backend resizes as we do: only float rounding differs (measured 2.4e-7)
ATOL = 1e-5
# its PIL backend resizes with Pillow's bicubic: up to 2 levels of 255 apart (measured 0.029 normalised)
PIL_ATOL = 3 / 255 / min(CLIP_STD)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_kwargs(max_pixels: int) -> dict:
    return dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56, max_pixels=max_pixels,
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def test_defaults_are_transformers_defaults():
    ours = Qwen2VLImageProcessor()
    for cls in (hf_fast.Qwen2VLImageProcessor, hf_pil.Qwen2VLImageProcessorPil):
        ref = cls()
        assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (
            ref.patch_size, ref.temporal_patch_size, ref.merge_size)
        assert (ours.min_pixels, ours.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
        assert torch.allclose(ours.mean.flatten(), torch.tensor(ref.image_mean))
        assert torch.allclose(ours.std.flatten(), torch.tensor(ref.image_std))


def test_yaml_builds_the_registered_processor_with_the_defaults():
    cfg = yaml.safe_load(YAML.read_text())
    cls = registry.get("processor", cfg.pop("type"))
    assert cls is Qwen2VLImageProcessor
    built, default = cls(**cfg), Qwen2VLImageProcessor()
    assert vars(built).keys() == vars(default).keys()
    for key, value in vars(default).items():
        assert torch.equal(value, vars(built)[key]) if torch.is_tensor(value) else value == vars(built)[key], key


@pytest.mark.parametrize(("size", "max_pixels"), SIZES)
def test_equal_to_transformers(size, max_pixels):
    image = random_image(*size)
    out = Qwen2VLImageProcessor(max_pixels=max_pixels)(image)
    assert isinstance(out, NativeImage)
    ref = hf_fast.Qwen2VLImageProcessor(**hf_kwargs(max_pixels))(images=image, return_tensors="pt")
    assert list(out.grid) == ref["image_grid_thw"][0].tolist()
    assert out.patches.dtype == torch.float32 and out.patches.shape == ref["pixel_values"].shape
    assert out.patches.shape == (int(np.prod(out.grid)), 3 * 2 * 14 * 14)
    torch.testing.assert_close(out.patches, ref["pixel_values"], rtol=0, atol=ATOL)
    # the PIL backend: the same grid, pixels within its resize's difference
    pil = hf_pil.Qwen2VLImageProcessorPil(**hf_kwargs(max_pixels))(images=image, return_tensors="pt")
    assert list(out.grid) == pil["image_grid_thw"][0].tolist()
    torch.testing.assert_close(out.patches, pil["pixel_values"], rtol=0, atol=PIL_ATOL)


@pytest.mark.parametrize(("size", "max_pixels"), SIZES)
def test_image_tokens_equal_to_the_qwen2_vl_processor(size, max_pixels):
    hf_image_processor = hf_fast.Qwen2VLImageProcessor(**hf_kwargs(max_pixels))
    processor = transformers.Qwen2VLProcessor(image_processor=hf_image_processor, tokenizer=tiny_qwen2_tokenizer(),
                                              video_processor=hf_video.Qwen2VLVideoProcessor())
    image = random_image(*size)
    text = "<|vision_start|><|image_pad|><|vision_end|>what is it?"
    batch = processor(images=[image], text=[text], return_tensors="pt")
    pads = int((batch["input_ids"] == processor.image_token_id).sum())
    ours = Qwen2VLImageProcessor(max_pixels=max_pixels)
    out = ours(image)
    assert ours.num_image_tokens(out.grid) == pads == int(batch["image_grid_thw"].prod()) // 4
    assert ours.num_image_tokens(torch.tensor(out.grid)) == pads


def tiny_qwen2_tokenizer():
    """A word-level tokenizer with Qwen2-VL's vision tokens (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {token: i for i, token in enumerate([*specials, "what", "is", "it", "?", "[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def test_patch_order_is_window_contiguous():
    """Each merge window's 4 patches are consecutive rows, (0,0), (0,1), (1,0), (1,1); windows row-major;
    each row is (channel, frame, y, x) with the frames equal."""
    proc = Qwen2VLImageProcessor()
    grid_h, grid_w = 4, 6
    pixels = torch.randn(3, grid_h * 14, grid_w * 14)
    patches = proc.patchify(pixels)
    row = 0
    for wr in range(grid_h // 2):
        for wc in range(grid_w // 2):
            for i in range(2):
                for j in range(2):
                    r, c = wr * 2 + i, wc * 2 + j
                    expect = pixels[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
                    got = patches[row].view(3, 2, 14, 14)
                    assert torch.equal(got[:, 0], expect) and torch.equal(got[:, 1], expect)
                    row += 1


def test_smart_resize_keeps_sides_multiples_of_28_and_area_in_bounds():
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 5000, 2))
        if max(h, w) > 200 * min(h, w):
            continue
        max_pixels = int(rng.choice([28 * 28 * 64, DEFAULT_MAX]))
        ours = smart_resize(h, w, 28, 56 * 56, max_pixels)
        assert ours == hf_fast.smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=max_pixels)
        assert ours[0] % 28 == 0 and ours[1] % 28 == 0 and ours[0] * ours[1] >= 56 * 56


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (30, 30), (1, 150), (8000, 6000), (20000, 101)])
def test_tiny_or_huge_images_do_not_crash(size):
    proc = Qwen2VLImageProcessor()
    out = proc(Image.new("RGB", size, (10, 200, 30)))
    t, h, w = out.grid
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and out.patches.shape[0] == t * h * w
    assert torch.isfinite(out.patches).all()
    assert 56 * 56 <= h * w * 14 * 14 <= 28 * 28 * 1280
    assert proc.num_image_tokens(out.grid) <= 1280


@pytest.mark.parametrize("size", [(1, 201), (30000, 100), (0, 0)])
def test_a_refused_size_is_a_skip_not_a_crash(size):
    """transformers raises ValueError beyond an aspect ratio of 200; we skip the sample, naming it."""
    with pytest.raises(SkipSample) as err:
        Qwen2VLImageProcessor()(Image.new("RGB", size))
    assert err.value.reason == "bad_image_size"


def test_non_rgb_modes_are_accepted():
    proc = Qwen2VLImageProcessor()
    for mode in ("L", "RGBA", "P"):
        assert proc(Image.new(mode, (50, 40))).grid == (1, 4, 6)  # 40 x 50 -> 56 x 84 (min_pixels)


def photo_with_orientation(orientation: int) -> bytes:
    pixels = np.zeros((56, 112, 3), dtype=np.uint8)
    pixels[:28, :28] = (255, 0, 0)  # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, tmp_path):
    data = photo_with_orientation(orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    as_stored = Image.open(io.BytesIO(data)).convert("RGB")
    image = load_image(tmp_path / "photo.png", data)
    default, stored = Qwen2VLImageProcessor(), Qwen2VLImageProcessor(exif_transpose=False)
    ours, ref = default(image), default(upright)
    assert ours.grid == ref.grid and torch.equal(ours.patches, ref.patches)
    assert stored(image).grid == stored(as_stored).grid and torch.equal(stored(image).patches, stored(as_stored).patches)
    if orientation in (5, 6, 7, 8):  # on its side: the grid turns
        assert ours.grid == (1, 8, 4) and stored(image).grid == (1, 4, 8)
