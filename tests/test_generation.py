"""Batched generation on the tiny VLM: left padding, images at prefill, stopping, beams, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lavis.models import build_model
from lavis.models.generation import left_pad, pad_after_stop, position_ids_from_mask
from lavis.processors.conversation import ConversationEncoder

MAX_NEW = 12


def random_image(seed: int, size: int = 80) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, processors, prompts): the tiny model (random weights, seed 0) and three prompts with
    0, 1 and 2 images, of clearly different lengths, through the real encoder and image processor."""
    from conftest import SFT_PROJECT, SMALL_WORLD_SIZES, sft_options

    from lavis.common.config import load_config
    from lavis.datasets.synthetic.world import ensure_world

    world = ensure_world(tmp_path_factory.mktemp("world") / "synthetic", sizes=SMALL_WORLD_SIZES)
    cfg = load_config(SFT_PROJECT, sft_options(world, tmp_path_factory.mktemp("out")))
    torch.manual_seed(0)
    model, proc = build_model(cfg.model)
    # At the default init (std 0.02, tied embeddings) a random LLM just repeats its last token; larger
    # transformer weights give varied, prompt- and image-dependent greedy output.
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.15)
    model.eval()
    encoder = ConversationEncoder(proc.tokenizer, model.num_image_tokens, cfg.model.system_message, 4096)
    conversations = [
        ("Hi.", []),
        ("Look at <img>a.png</img> and describe in detail what you see there, please, thank you.", [1]),
        ("Compare <img>b.png</img> with <img>c.png</img>: which one is brighter?", [2, 3]),
    ]
    prompts = []
    for text, seeds in conversations:
        enc = encoder.encode_messages([{"role": "user", "content": text}], add_generation_prompt=True)
        assert len(enc.images) == len(seeds)
        pixels = [proc.image(random_image(s)) for s in seeds]
        size = proc.image.image_size
        prompts.append((enc.input_ids, torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)))
    lengths = [len(ids) for ids, _ in prompts]
    assert len(set(lengths)) == 3 and max(lengths) - min(lengths) > 30, lengths
    return model, proc, prompts


def batch_of(prompts, pad_id):
    ids, mask = left_pad([p for p, _ in prompts], pad_id)
    return ids, mask, torch.cat([px for _, px in prompts])


def trim(row: list[int], stop_ids, pad_id) -> list[int]:
    """Tokens up to and including the first stop id."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1]
    return row


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert pad_after_stop(torch.tensor([[1, 9, 2, 3], [4, 5, 6, 7]]), [9], 0).tolist() == [[1, 9, 0, 0], [4, 5, 6, 7]]


def test_batched_greedy_equals_unbatched(setup):
    model, proc, prompts = setup
    tok = proc.tokenizer
    stops, pad = tok.stop_ids, tok.pad_id
    ids, mask, pixels = batch_of(prompts, pad)
    assert (mask == 0).any(), "the batch must actually be left-padded"
    batched = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, stop_ids=stops, pad_id=pad)
    assert batched.dtype == torch.long and batched.shape[0] == 3 and batched.shape[1] <= MAX_NEW
    outputs = []
    for (p, px), row in zip(prompts, batched.tolist()):
        single_ids, single_mask = left_pad([p], pad)
        single = model.generate(single_ids, single_mask, px, max_new_tokens=MAX_NEW, stop_ids=stops, pad_id=pad)
        single_row = trim(single[0].tolist(), stops, pad)
        assert trim(row, stops, pad) == single_row
        # after a stop, the batched row holds only pads
        assert all(t == pad for t in row[len(single_row) :])
        outputs.append(single_row)
    assert sum(len(o) for o in outputs) > 3, f"generation stopped at once: {outputs}"
    assert len({tuple(o) for o in outputs}) > 1, f"all prompts gave the same output: {outputs}"


def test_position_ids_follow_the_attention_mask(setup):
    """The LLM sees per-row positions that ignore left pads, at prefill and at every cached step."""
    model, proc, prompts = setup
    ids, mask, pixels = batch_of(prompts, proc.tokenizer.pad_id)
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs.get("position_ids"), kwargs.get("inputs_embeds") is not None))

    handle = model.llm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(ids, mask, pixels, max_new_tokens=4, stop_ids=(), pad_id=proc.tokenizer.pad_id)
    finally:
        handle.remove()
    assert len(seen) == 4
    prefill, used_embeds = seen[0]
    assert used_embeds, "prefill must run on inputs_embeds (the image vectors)"
    assert torch.equal(prefill, position_ids_from_mask(mask))
    lengths = mask.sum(1)
    for step, (pos, used_embeds) in enumerate(seen[1:]):
        assert not used_embeds, "decode steps continue from token ids"
        assert pos.shape == (3, 1)
        assert pos[:, 0].tolist() == (lengths + step).tolist()


def test_image_changes_the_output(setup):
    model, proc, prompts = setup
    ids, pixels = prompts[1]
    ids, mask = left_pad([ids], proc.tokenizer.pad_id)
    other = torch.stack([proc.image(random_image(99))])
    with torch.no_grad():
        a = model(ids, mask, pixel_values=pixels).logits[0, -1]
        b = model(ids, mask, pixel_values=other).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-5)
    out_a = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, stop_ids=())
    out_b = model.generate(ids, mask, other, max_new_tokens=MAX_NEW, stop_ids=())
    assert out_a.shape == out_b.shape == (1, MAX_NEW)
    assert not torch.equal(out_a, out_b)


def test_stops_at_stop_id_and_pads(setup):
    model, proc, prompts = setup
    pad = proc.tokenizer.pad_id
    ids, mask, pixels = batch_of(prompts, pad)
    free = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, stop_ids=(), pad_id=pad)
    assert free.shape == (3, MAX_NEW)
    # a token that row 0 emits at step 3 (and not before) becomes the stop id
    stop = None
    for step in range(2, MAX_NEW - 1):
        candidate = int(free[0, step])
        if candidate not in free[0, :step].tolist() and candidate != pad:
            stop, stop_step = candidate, step
            break
    assert stop is not None, f"no usable stop token in {free[0].tolist()}"
    out = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, stop_ids=(stop,), pad_id=pad)
    row = out[0].tolist()
    assert row[: stop_step + 1] == free[0, : stop_step + 1].tolist()
    assert row[stop_step] == stop
    assert all(t == pad for t in row[stop_step + 1 :])
    for i in range(3):  # every row: the free output up to its first stop, then pads
        expected = trim(free[i].tolist(), (stop,), pad)
        got = out[i].tolist()
        assert got[: len(expected)] == expected
        assert all(t == pad for t in got[len(expected) :])
    if all(stop in free[i].tolist() for i in range(3)):
        assert out.shape[1] < MAX_NEW


def test_beam_search_returns_valid_ids(setup):
    model, proc, prompts = setup
    tok = proc.tokenizer
    ids, mask, pixels = batch_of(prompts, tok.pad_id)
    out = model.generate(ids, mask, pixels, max_new_tokens=8, num_beams=2, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    assert out.dtype == torch.long and out.shape[0] == 3 and 1 <= out.shape[1] <= 8
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    assert int(out.min()) >= 0 and int(out.max()) < vocab
    again = model.generate(ids, mask, pixels, max_new_tokens=8, num_beams=2, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    assert torch.equal(out, again)


def test_sampling_is_reproducible_with_a_seed(setup):
    model, proc, prompts = setup
    tok = proc.tokenizer
    ids, mask, pixels = batch_of(prompts, tok.pad_id)

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(
            ids, mask, pixels, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, top_p=0.95,
            stop_ids=(), pad_id=tok.pad_id,
        )

    a, b, c = sample(1), sample(1), sample(2)
    assert a.shape == (3, MAX_NEW)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # with random weights and temperature 1.5, two seeds differ
    greedy = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, stop_ids=(), pad_id=tok.pad_id)
    assert not torch.equal(a, greedy)


def test_generate_keeps_training_mode_and_rejects_right_padding(setup):
    model, _, prompts = setup
    ids, mask = left_pad([prompts[0][0], prompts[0][0][:5]], 0)
    model.train()
    try:
        model.generate(ids, mask, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, mask.flip(1), max_new_tokens=2)


def test_suppressed_ids_are_never_generated(setup):
    """Tokens that row 0 emits freely never appear once suppressed (greedy and beam); chat and
    evaluation suppress the image-span tokens this way."""
    model, proc, prompts = setup
    pad = proc.tokenizer.pad_id
    ids, mask, pixels = batch_of(prompts, pad)
    free = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, stop_ids=(), pad_id=pad)
    banned = sorted(set(free[0].tolist()) - {pad})[:3]
    assert banned
    for beams in (1, 2):
        out = model.generate(ids, mask, pixels, max_new_tokens=MAX_NEW, num_beams=beams, stop_ids=(), pad_id=pad,
                             suppress_ids=banned)
        assert not set(out.flatten().tolist()) & set(banned)
    spans = [proc.tokenizer.decode([i]) for i in proc.tokenizer.image_span_ids]
    assert spans == ["<img>", "</img>", "<imgpad>"]
