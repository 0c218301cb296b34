"""Native resolution through the whole path: per-image token spans, collate, the model's scatter, M-RoPE
positions (equal to transformers' ``get_rope_index``), packing that is exact under M-RoPE, generation,
and the build-time checks that components fit together."""

from __future__ import annotations

import pytest
import torch
from helpers import moving_squares, write_video
from PIL import Image

from lavis.datasets.collate import PackCollator, PadCollator
from lavis.models import build_model
from lavis.models.positions import mrope_position_ids, position_ids_from_mask
from lavis.processors.conversation import ConversationEncoder, image_reference
from lavis.processors.native_image import PatchImages
from lavis.processors.sample import SampleProcessor

TEXT_CONFIG = ("{model_type: qwen2_vl, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
               "intermediate_size: 128, vocab_size: 1088, bos_token_id: null, eos_token_id: null, "
               "rope_parameters: {rope_type: default, rope_theta: 10000.0, mrope_section: [2, 3, 3]}, tie_word_embeddings: true}")
NATIVE = (
    "model.vision.type=qwen2_vl_vit",
    "model.vision.config={model_type: qwen2_vl, depth: 2, embed_dim: 32, hidden_size: 64, num_heads: 2, mlp_ratio: 2}",
    "model.adapter.type=patch_merger",
    "model.llm.type=qwen2_vl_lm",
    f"model.llm.config={TEXT_CONFIG}",
    "model.image_processor.type=qwen2_vl_image",
    "model.image_processor.min_pixels=3136",   # 56 x 56: 4 tokens at least
    "model.image_processor.max_pixels=50176",  # 224 x 224: 64 tokens at most
    "model.video_processor.min_pixels=3136",   # per frame, as the images
    "model.video_processor.max_pixels=12544",  # 112 x 112 per frame: 16 tokens per temporal patch at most
    "model.freeze.vision=trainable",
)
# (width, height): wide, tall, one below min_pixels (scaled up), one over max_pixels (scaled down), square
SIZES = {"wide.png": (150, 60), "tall.png": (50, 130), "small.png": (20, 24), "large.png": (500, 400), "square.png": (64, 64)}


@pytest.fixture
def native(load_sft, tmp_path):
    """(model, processors, SampleProcessor over tmp_path's pictures) of a tiny Qwen2-VL-shaped model."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for name, size in SIZES.items():
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / name)
    cfg = load_sft(*NATIVE)
    model, proc = build_model(cfg.model)
    write_video(tmp_path / "clip.mp4", moving_squares(10), rate=4)  # 2.5 s at 4 fps: 4 frames kept (2 fps, even), 2 temporal patches
    encoder = ConversationEncoder(proc.tokenizer, model.image_tokens, cfg.model.system_message, max_len=4096)
    return model, proc, SampleProcessor(encoder, proc.image, truncate=False, video_processor=proc.video)


def conversation(images: list[str], question: str, answer: str, root) -> dict:
    content = "".join(image_reference(name) for name in images) + question
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}], "image_root": str(root)}


def records(root) -> list[dict]:
    return [
        conversation(["wide.png"], "What is on the left?", "A red square.", root),
        conversation(["tall.png", "large.png"], "Compare the two pictures.", "The first is taller than the second.", root),
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]},
        conversation(["small.png"], "Describe it.", "Noise.", root),
        conversation(["square.png", "wide.png", "small.png"], "How many?", "Three.", root),
    ]


def test_each_image_takes_its_own_number_of_tokens(native, tmp_path):
    model, proc, samples = native
    tok = proc.tokenizer
    sample = samples(records(tmp_path)[1])
    grids = sample["pixel_values"].grid_thw.tolist()
    assert grids == [[1, 10, 4], [1, 14, 16]]  # tall 50x130 -> 56 x 140; large scaled to <= 224*224 area: 224 x 196
    ids = sample["input_ids"].tolist()
    starts = [i for i, t in enumerate(ids) if t == tok.img_start_id]
    spans = [ids[s + 1 : ids.index(tok.img_end_id, s)] for s in starts]
    assert [len(span) for span in spans] == [10 * 4 // 4, 14 * 16 // 4] == [model.image_tokens(g) for g in grids]
    assert all(t == tok.img_pad_id for span in spans for t in span)
    assert sample["pixel_values"].patches.shape == (10 * 4 + 14 * 16, 3 * 2 * 14 * 14)
    # below min_pixels: scaled up to at least 56 x 56; over max_pixels: scaled down under it (never an error)
    small, large = samples(records(tmp_path)[3])["pixel_values"], sample["pixel_values"]
    assert small.grid_thw[0].prod() * 14 * 14 >= 3136 and large.grid_thw[1].prod() * 14 * 14 <= 50176


def test_truncation_never_cuts_an_image(native, tmp_path):
    model, proc, samples = native
    from lavis.processors.errors import SkipSample

    whole = samples(records(tmp_path)[1])
    encoder = ConversationEncoder(proc.tokenizer, model.image_tokens, "You are a helpful assistant.", max_len=30)
    with pytest.raises(SkipSample, match="cut inside an image"):
        SampleProcessor(encoder, proc.image)(records(tmp_path)[1])
    assert len(whole["input_ids"]) > 30


def test_collate_concatenates_patches_and_grids(native, tmp_path):
    _, proc, samples = native
    batch = PadCollator(proc.tokenizer.pad_id)([samples(r) for r in records(tmp_path)])
    pixels = batch["pixel_values"]
    assert isinstance(pixels, PatchImages) and pixels.num_images == 7
    assert pixels.patches.shape[0] == int(pixels.grid_thw.prod(-1).sum())
    text_only = samples(records(tmp_path)[2])["pixel_values"]
    assert text_only.num_images == 0 and text_only.patches.shape == (0, 3 * 2 * 14 * 14)


def test_mrope_positions_equal_transformers_get_rope_index(native, tmp_path):
    """The positions of a left-padded batch of images of several sizes, text-only row included, are
    transformers' own (get_rope_index fed the processor's mm_token_type_ids)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    model, proc, samples = native
    rows = [samples(r) for r in records(tmp_path)]
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), proc.tokenizer.pad_id)
    mask = torch.zeros_like(input_ids)
    for k, row in enumerate(rows):
        input_ids[k, length - len(row["input_ids"]) :] = row["input_ids"]
        mask[k, length - len(row["input_ids"]) :] = 1
    pixels = PadCollator(proc.tokenizer.pad_id)(rows)["pixel_values"]
    ours = model.llm_position_ids(input_ids, mask, None, pixels)
    reference = Qwen2VLModel.get_rope_index(
        _RopeConfig(), input_ids, (input_ids == proc.tokenizer.img_pad_id).int(), image_grid_thw=pixels.grid_thw,
        attention_mask=mask,
    )[0]
    assert ours.shape == (3, len(rows), length)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours[1], ours[2])  # the images give height and width positions of their own


class _RopeConfig:
    """What transformers' get_rope_index reads of its model (spatial_merge_size 2)."""

    class config:  # noqa: N801
        class vision_config:  # noqa: N801
            spatial_merge_size = 2

    get_vision_position_ids = staticmethod(lambda *a, **k: __import__(
        "transformers.models.qwen2_vl.modeling_qwen2_vl", fromlist=["Qwen2VLModel"]).Qwen2VLModel.get_vision_position_ids(None, *a, **k))


def test_packed_rows_restart_positions_at_every_sample():
    """mrope_position_ids on a packed row equals each sample's own positions, side by side."""
    pad = 9
    a = torch.tensor([[1, 2, pad, pad, pad, pad, pad, pad, 3, 4]])  # one image of 2x3 tokens
    b = torch.tensor([[5, pad, pad, pad, pad, 6]])  # one image of 2x2 tokens
    alone = [mrope_position_ids(x, torch.arange(x.shape[1])[None], g, pad) for x, g in ((a, [(1, 2, 3)]), (b, [(1, 2, 2)]))]
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    together = mrope_position_ids(packed, positions, [(1, 2, 3), (1, 2, 2)], pad)
    assert torch.equal(together, torch.cat(alone, -1))
    assert together[:, 0, 8].tolist() == [5, 5, 5]  # after a 2x3 image starting at 2: 2 + max(2, 3)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), pixel_values=batch["pixel_values"], **batch.get("attention_kwargs", {}))
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), int(out.num_tokens), grads


def test_packed_equals_unpacked_under_mrope(native, tmp_path):
    """Images of different sizes, several in one sample, a video beside an image, and text-only samples:
    packed rows give the padded batch's loss and every gradient (1e-5)."""
    model, proc, samples = native
    model.train()
    video = {"messages": [{"role": "user", "content": "<video>clip.mp4</video><img>small.png</img>Where does the square go?"},
                          {"role": "assistant", "content": "To the right."}], "image_root": str(tmp_path)}
    rows = [samples(r) for r in records(tmp_path) + [video]]
    assert rows[5]["pixel_values"].grid_thw[0, 0] == 2 and rows[5]["pixel_values"].second_per_grid[0] == 1.25  # 2 / 1.6 fps
    pads = torch.isin(rows[5]["input_ids"], torch.tensor([proc.tokenizer.img_pad_id, proc.tokenizer.vid_pad_id])).sum()
    assert pads == sum(model.image_tokens(grid) for grid in rows[5]["pixel_values"].grid_thw)  # the video's 8 and the image's
    padded = PadCollator(proc.tokenizer.pad_id)(rows)
    packed = PackCollator(proc.tokenizer.pad_id)([[rows[0], rows[2], rows[1]], [rows[3], rows[5], rows[4]]])
    loss, tokens, grads = _loss_and_grads(model, padded)
    loss_p, tokens_p, grads_p = _loss_and_grads(model, packed)
    assert tokens == tokens_p
    assert torch.allclose(loss, loss_p, rtol=0, atol=1e-5 * max(1.0, float(loss.abs())))
    assert grads.keys() == grads_p.keys() and any(n.startswith("vision.") for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_p[name], rtol=1e-4, atol=1e-5), name


def test_generation_of_a_row_is_the_same_alone_and_in_a_batch(native, tmp_path):
    model, proc, samples = native
    model.eval()
    from lavis.models.chat import encode_chat
    from lavis.models.generation import left_pad

    model.attach_processors(proc, "You are a helpful assistant.")
    prompts = [
        [{"role": "user", "content": f"{image_reference(str(tmp_path / 'wide.png'))}What is it?"}],
        [{"role": "user", "content": "Just text, no picture at all here."}],
        [{"role": "user", "content": f"{image_reference(str(tmp_path / 'tall.png'))}{image_reference(str(tmp_path / 'small.png'))}Both?"}],
    ]
    encoded = [encode_chat(model, p) for p in prompts]
    options = {"max_new_tokens": 12, "stop_ids": (), "pad_id": proc.tokenizer.pad_id}
    ids, mask = left_pad([ids for ids, _ in encoded], proc.tokenizer.pad_id)
    from lavis.processors.native_image import cat_images

    together = model.generate(ids, mask, cat_images([pixels for _, pixels in encoded]), **options)
    for k, (row_ids, pixels) in enumerate(encoded):
        alone = model.generate(torch.tensor([row_ids]), None, pixels, **options)
        assert torch.equal(alone[0], together[k]), k


def test_ablation_grid_builds_and_an_mrope_llm_needs_a_grid(load_sft):
    """{timm ViT, qwen2_vl_vit} x {patch_merger, mlp} with the M-RoPE LLM build and give a loss; the
    resampler gives no grid, so with an M-RoPE LLM it fails at build naming both keys."""
    llm = ("model.llm.type=qwen2_vl_lm", f"model.llm.config={TEXT_CONFIG}")
    for vision in ((), NATIVE[:2] + NATIVE[5:8]):
        for adapter in ("patch_merger", "mlp"):
            cfg = load_sft(*vision, f"model.adapter.type={adapter}", *llm)
            model, _ = build_model(cfg.model)
            assert model.position_dims == 3
    with pytest.raises(ValueError, match=r"model\.llm \(qwen2_vl_lm\).*model\.adapter \(qwen_resampler\)"):
        build_model(load_sft(*llm).model)


def test_a_processor_that_does_not_fit_the_vision_encoder_fails_at_build(load_sft):
    with pytest.raises(ValueError, match=r"model\.vision \(timm_vit\) takes fixed-size images.*qwen2_vl_image"):
        build_model(load_sft("model.image_processor.type=qwen2_vl_image").model)
    with pytest.raises(ValueError, match=r"model\.vision \(qwen2_vl_vit\) takes native-resolution.*clip_image"):
        build_model(load_sft(*NATIVE[:2], "model.image_processor.image_size=224").model)
    with pytest.raises(ValueError, match=r"model\.image_processor\.merge_size \(1\)"):
        build_model(load_sft(*NATIVE, "model.image_processor.merge_size=1").model)


def test_video_positions_equal_qwen2_5_vl_get_rope_index():
    """Images and videos mixed in a left-padded batch: time-aligned temporal positions (tokens_per_second x
    seconds per temporal patch, truncated) and the text after each as transformers 5's Qwen2.5-VL places them."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
            "vocab_size": 100, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision = {"depth": 1, "hidden_size": 16, "out_hidden_size": 32, "num_heads": 2, "intermediate_size": 32, "tokens_per_second": 2}
    reference = Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    image, video = 7, 8
    rows = [[1, 2] + [image] * 6 + [4] + [video] * 12 + [5, 6], [1] + [video] * 4 + [9] + [image] * 4 + [3]]
    length = max(map(len, rows)) + 1
    ids, mask = torch.zeros(2, length, dtype=torch.long), torch.zeros(2, length, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, length - len(row):], mask[r, length - len(row):] = torch.tensor(row), 1
    image_grids, video_grids, seconds = torch.tensor([[1, 4, 6], [1, 4, 4]]), torch.tensor([[3, 4, 4], [2, 2, 4]]), torch.tensor([1.5, 0.5])
    expected = reference.get_rope_index(ids, (ids == image).int() + 2 * (ids == video).int(), image_grid_thw=image_grids,
                                        video_grid_thw=video_grids, second_per_grid_ts=seconds, attention_mask=mask)[0]
    in_order = [image_grids[0], video_grids[0], video_grids[1], image_grids[1]]  # as they appear in the batch
    grids = [(int(t), int(h) // 2, int(w) // 2) for t, h, w in in_order]
    ours = mrope_position_ids(ids, position_ids_from_mask(mask), grids, [image, video], [1.0, 2 * 1.5, 2 * 0.5, 1.0])
    assert torch.equal(ours, expected)
    assert ours[0, 0, 14:18].tolist() == [9] * 4  # the video's second temporal patch: 1.5 s x 2 tokens/s = 3 steps on
