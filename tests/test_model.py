"""The tiny VLM: image injection at <imgpad>, the issue's three config-only ablations, text-only
gradients, weight-decay groups and the learning-rate schedule."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess

import pytest
import torch
import yaml
from conftest import popen_train, sft_options
from safetensors.torch import load_file

from lavis.common.optim import (
    build_optimizer,
    constant_with_warmup,
    linear_warmup_cosine,
    parameter_groups,
)
from lavis.datasets.collate import PadCollator
from lavis.models import build_model
from lavis.models.freeze import parameter_counts
from lavis.processors.conversation import IGNORE_INDEX, ConversationEncoder
from lavis.processors.sample import SampleProcessor


def tiny_dims(cfg) -> tuple[int, int, int]:
    """(LLM hidden size, vision width, patches per image) of the configured tiny model."""
    vision = cfg.model.vision.params
    hidden = cfg.model.llm.params["config"]["hidden_size"]
    width = vision["model_kwargs"]["embed_dim"]
    patches = (vision["image_size"] // vision["model_kwargs"]["patch_size"]) ** 2
    return hidden, width, patches


def resampler_params(num_queries: int, d: int) -> int:
    """query + proj + MultiheadAttention (in_proj, out_proj) + ln_q/ln_kv/ln_post (kv_proj = identity: width == d)."""
    return num_queries * d + d * d + (3 * d * d + 3 * d) + (d * d + d) + 3 * 2 * d


@pytest.fixture
def tiny(load_sft):
    """(cfg, model, processors) of the embedded tiny model, built fresh with the test's seed."""

    def build(*options: str):
        cfg = load_sft(*options)
        torch.manual_seed(0)
        model, processors = build_model(cfg.model)
        return cfg, model, processors

    return build


def rows_to_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


# --------------------------------------------------------------------------- image injection


def test_image_vectors_land_exactly_at_the_imgpad_positions(tiny):
    cfg, model, proc = tiny()
    tok = proc.tokenizer
    n = model.num_image_tokens
    assert n == cfg.model.adapter.params["num_queries"] == 36
    span = [tok.img_start_id] + [tok.img_pad_id] * n + [tok.img_end_id]
    enc = tok.encode
    rows = [
        enc("A sample without any image."),  # 0 images
        enc("Look at Picture 1: ") + span + enc(" what is in the middle of this text?"),  # 1 image, mid-text
        enc("First") + span + enc(" and then, between them, ") + span + enc(" the end."),  # 2 images
    ]
    ids, mask = rows_to_batch(rows, tok.pad_id)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 64, 64, generator=gen)

    model.eval()
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels)
        feats = model.encode_images(pixels)
        tokens = model.llm.get_input_embeddings()(ids)
    assert feats.shape == (3, n, 128)
    assert not torch.equal(feats[1], feats[2])  # distinct images, so their order is checked below

    pads = ids == tok.img_pad_id
    assert pads.sum(1).tolist() == [0, n, 2 * n]
    assert torch.equal(embeds[~pads], tokens[~pads])  # text (and padding) untouched

    def pad_run(start: int) -> list[int]:
        return list(range(start, start + n))

    p1 = len(enc("Look at Picture 1: ")) + 1
    p2a = len(enc("First")) + 1
    p2b = p2a + n + 1 + len(enc(" and then, between them, ")) + 1
    assert pads[1].nonzero().flatten().tolist() == pad_run(p1)
    assert pads[2].nonzero().flatten().tolist() == pad_run(p2a) + pad_run(p2b)
    assert p1 > 0 and p1 + n < len(rows[1]) - 1 and p2b + n < len(rows[2]) - 1  # images inside the text
    assert torch.equal(embeds[1, p1 : p1 + n], feats[0])
    assert torch.equal(embeds[2, p2a : p2a + n], feats[1])
    assert torch.equal(embeds[2, p2b : p2b + n], feats[2])

    with torch.no_grad():
        logits = model(ids, attention_mask=mask, pixel_values=pixels).logits
    assert logits.shape == (3, ids.shape[1], model.llm.get_input_embeddings().num_embeddings)
    assert torch.isfinite(logits).all()


def test_images_and_pads_that_do_not_match_raise(tiny):
    _, model, proc = tiny()
    tok = proc.tokenizer
    n = model.num_image_tokens
    span = [tok.img_start_id] + [tok.img_pad_id] * n + [tok.img_end_id]
    short = [tok.img_start_id] + [tok.img_pad_id] * (n - 1) + [tok.img_end_id]
    pixels = torch.randn(2, 3, 64, 64)
    model.eval()
    cases = [
        (rows_to_batch([span + span], tok.pad_id)[0], pixels[:1], f"1 images give {n} image vectors for the {2 * n} <imgpad>"),
        (rows_to_batch([span, short], tok.pad_id)[0], pixels, f"2 images give {2 * n} image vectors for the {2 * n - 1} <imgpad>"),
        (rows_to_batch([tok.encode("no pads")], tok.pad_id)[0], pixels[:1], f"1 images give {n} image vectors for the 0 <imgpad>"),
    ]
    for ids, pix, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            model.embed_inputs(ids, pix)


RECORDS_WITH_0_1_2_IMAGES = [
    {"messages": [{"role": "user", "content": "What colour is a ripe tomato?"}, {"role": "assistant", "content": "red"}]},
    {"messages": [
        {"role": "user", "content": "Picture 1: <img>images/train/000003.png</img>\nDescribe the image."},
        {"role": "assistant", "content": "A shape."},
    ]},
    {"messages": [
        {"role": "user",
         "content": "Picture 1: <img>images/train/000001.png</img>\nPicture 2: <img>images/train/000002.png</img>\nHow many?"},
        {"role": "assistant", "content": "2"},
    ]},
]


def test_collated_samples_with_0_1_2_images(tiny, small_world):
    """The real path: conversations -> sample processor -> pad collator -> the loss through forward."""
    cfg, model, proc = tiny()
    encoder = ConversationEncoder(proc.tokenizer, model.num_image_tokens, cfg.model.system_message, 256)
    process = SampleProcessor(encoder, proc.image)
    samples = [process({**r, "image_root": str(small_world)}) for r in RECORDS_WITH_0_1_2_IMAGES]
    assert [s["pixel_values"].shape[0] for s in samples] == [0, 1, 2]
    batch = PadCollator(pad_id=proc.tokenizer.pad_id)(samples)
    ids = batch["input_ids"]
    pads = ids == proc.tokenizer.img_pad_id
    n = model.num_image_tokens
    assert pads.sum(1).tolist() == [0, n, 2 * n]
    assert (batch["labels"][pads] == IGNORE_INDEX).all()  # image pads are never supervised
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert torch.equal(batch["pixel_values"][1:], samples[2]["pixel_values"])  # sample order

    model.eval()
    with torch.no_grad():
        embeds = model.embed_inputs(ids, batch["pixel_values"])
        feats = model.encode_images(batch["pixel_values"])
        out = model(ids, labels=batch["labels"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    assert torch.equal(embeds[pads], feats.reshape(-1, feats.shape[-1]))
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(out.num_tokens) == supervised > 0
    assert torch.isfinite(out.loss_sum) and float(out.loss_sum) > 0


# --------------------------------------------------------------------------- the three overrides

BASE_RUN = ("run.max_steps=2", "run.warmup_steps=1", "run.save_every=1000")
OVERRIDES = {
    "queries16": ("model.adapter.num_queries=16",),
    "mlp": ("model.adapter.type=mlp",),
    "llm_frozen": ("model.freeze.llm=frozen",),
}
TABLE_ROW = re.compile(r"^(vision|adapter|llm|total)\s+(trainable|frozen)?\s*([\d,]+)\s+([\d,]+)\s*$", re.MULTILINE)


@pytest.fixture(scope="module")
def override_runs(small_world, tmp_path_factory):
    """The three overrides, each a 2-step ``train.py`` run in its own subprocess (run side by side)."""
    root = tmp_path_factory.mktemp("overrides")
    procs = {}
    for name, extra in OVERRIDES.items():
        procs[name] = popen_train(sft_options(small_world, root / name, *BASE_RUN, *extra), root / f"{name}.log")
    results = {}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log = (root / f"{name}.log").read_text()
        table = {m[0]: (m[1], int(m[2].replace(",", "")), int(m[3].replace(",", ""))) for m in TABLE_ROW.findall(log)}
        results[name] = {"rc": proc.returncode, "log": log, "table": table, "out": root / name}
    return results


def check_run(run: dict) -> dict:
    assert run["rc"] == 0, run["log"][-3000:]
    records = [json.loads(x) for x in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(5.0 < r["loss"] < 9.0 for r in records)
    return yaml.safe_load((run["out"] / "config.yaml").read_text())


def image_sample_length(cfg, model, proc) -> int:
    encoder = ConversationEncoder(proc.tokenizer, model.num_image_tokens, cfg.model.system_message, 4096)
    msgs = [{"role": "user", "content": "Picture 1: <img>a.png</img>\nWhat?"}, {"role": "assistant", "content": "red"}]
    return len(encoder.encode_messages(msgs).input_ids)


def test_baseline_parameter_table(tiny):
    cfg, model, _ = tiny()
    d, width, _ = tiny_dims(cfg)
    assert width == d  # kv_proj is the identity in the tiny model, as resampler_params assumes
    counts = parameter_counts(model.components)
    assert counts["adapter"] == {"total": resampler_params(36, d), "trainable": resampler_params(36, d)} == {
        "total": 87_808, "trainable": 87_808
    }
    report = model.parameter_report()
    assert re.search(r"^adapter\s+trainable\s+87,808\s+87,808$", report, re.MULTILINE), report


@pytest.mark.integration
def test_override_num_queries_16(override_runs, tiny):
    run = override_runs["queries16"]
    config = check_run(run)
    assert config["model"]["adapter"] == {"type": "qwen_resampler", "num_queries": 16, "num_heads": None}
    base_cfg, base_model, base_proc = tiny()
    cfg, model, proc = tiny(*OVERRIDES["queries16"])
    d = tiny_dims(cfg)[0]
    adapter = resampler_params(16, d)
    assert adapter == parameter_counts(base_model.components)["adapter"]["total"] - 20 * d
    assert run["table"]["adapter"] == ("trainable", adapter, adapter)
    assert run["table"]["vision"] == ("trainable", *[parameter_counts(base_model.components)["vision"]["total"]] * 2)
    # 16 image tokens instead of 36: every image shortens the input by 20 tokens
    assert (base_model.num_image_tokens, model.num_image_tokens) == (36, 16)
    assert image_sample_length(base_cfg, base_model, base_proc) - image_sample_length(cfg, model, proc) == 20
    assert model.encode_images(torch.randn(2, 3, 64, 64)).shape == (2, 16, d)


@pytest.mark.integration
def test_override_mlp_adapter(override_runs, tiny):
    run = override_runs["mlp"]
    config = check_run(run)
    assert config["model"]["adapter"] == {"type": "mlp", "num_layers": 2}  # num_queries dropped
    assert "dropped keys that 'mlp' does not accept: num_queries" in run["log"]
    cfg, model, _ = tiny(*OVERRIDES["mlp"])
    d, width, patches = tiny_dims(cfg)
    adapter = (width * d + d) + (d * d + d)  # Linear(width, d), GELU, Linear(d, d)
    assert adapter == 33_024 != resampler_params(36, d)
    assert run["table"]["adapter"] == ("trainable", adapter, adapter)
    assert model.num_image_tokens == patches == 64  # one image token per patch
    assert model.encode_images(torch.randn(1, 3, 64, 64)).shape == (1, 64, d)


@pytest.mark.integration
def test_override_frozen_llm(override_runs, tiny, load_sft):
    from lavis.runners import build_runner

    run = override_runs["llm_frozen"]
    config = check_run(run)
    assert config["model"]["freeze"] == {"vision": {"type": "trainable"}, "adapter": {"type": "trainable"}, "llm": {"type": "frozen"}}
    _, model, _ = tiny(*OVERRIDES["llm_frozen"])
    counts = parameter_counts(model.components)
    llm_total = counts["llm"]["total"]
    assert llm_total > 1_000_000 and counts["llm"]["trainable"] == 0
    assert run["table"]["llm"] == ("frozen", llm_total, 0)
    trainable = counts["vision"]["total"] + counts["adapter"]["total"]
    assert run["table"]["total"][1:] == (trainable + llm_total, trainable)

    # Not in the trainable checkpoint of the subprocess run.
    weights = load_file(str(run["out"] / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert weights and not any(k.startswith("llm.") for k in weights)
    assert sum(w.numel() for w in weights.values()) == trainable

    # Not in the optimiser; eval mode survives model.train(); weights do not move.
    runner = build_runner(load_sft(*BASE_RUN, *OVERRIDES["llm_frozen"]))
    llm_ids = {id(p) for p in runner.model.llm.parameters()}
    opt_ids = {id(p) for g in runner.optimizer.param_groups for p in g["params"]}
    assert not llm_ids & opt_ids
    assert len(opt_ids) == len([p for p in runner.model.parameters() if p.requires_grad])
    runner.model.train()
    assert not any(m.training for m in runner.model.llm.modules())
    assert runner.model.adapter.training and runner.model.vision.training
    before = {k: v.clone() for k, v in runner.model.llm.state_dict().items()}
    adapter_before = runner.model.adapter.query.detach().clone()
    runner.train()
    assert all(torch.equal(before[k], v) for k, v in runner.model.llm.state_dict().items())
    assert not torch.equal(adapter_before, runner.model.adapter.query.detach())


# --------------------------------------------------------------------------- gradients of text-only batches


def text_only_batch(proc) -> dict[str, torch.Tensor]:
    tok = proc.tokenizer
    ids, mask = rows_to_batch([tok.encode("What colour is the sky? blue"), tok.encode("Which shape has no corners? circle")], tok.pad_id)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("pixels", ["empty", "none"])
def test_text_only_batch_still_gives_visual_parameters_a_zero_gradient(tiny, pixels):
    _, model, proc = tiny()
    batch = text_only_batch(proc)
    pixel_values = torch.zeros(0, 3, 64, 64) if pixels == "empty" else None  # the collator gives "empty"
    model.train()
    out = model(**batch, pixel_values=pixel_values)
    (out.loss_sum / out.num_tokens).backward()
    for name in ("vision", "adapter"):
        params = list(getattr(model, name).named_parameters())
        missing = [n for n, p in params if p.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:3]}"
        assert all(torch.count_nonzero(p.grad) == 0 for _, p in params)
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.llm.parameters())


def test_text_only_batch_with_frozen_vision(tiny):
    _, model, proc = tiny("model.freeze.vision=frozen")
    model.train()
    out = model(**text_only_batch(proc), pixel_values=torch.zeros(0, 3, 64, 64))
    out.loss_sum.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.adapter.parameters())


def test_vision_every_step_runs_the_frozen_visual_path_without_images(tiny):
    """Sharding strategies set ``vision_every_step``: a batch without images still calls the ViT and
    the adapter (whose parameters are gathered in their forward), frozen or not, in training and eval."""
    _, model, proc = tiny("model.freeze.vision=frozen", "model.freeze.adapter=frozen")
    calls = []
    for name in ("vision", "adapter"):
        getattr(model, name).register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    batch = text_only_batch(proc)
    model.train()
    reference = model(**batch, pixel_values=torch.zeros(0, 3, 64, 64)).loss_sum
    assert calls == []  # nothing trainable needs the visual path
    model.vision_every_step = True
    for mode in (True, False):
        model.train(mode)
        calls.clear()
        with torch.set_grad_enabled(mode):
            out = model(**batch, pixel_values=torch.zeros(0, 3, 64, 64))
        assert calls == ["vision", "adapter"]
        assert torch.equal(out.loss_sum, reference)  # weighted by zero


def test_activation_checkpointing_wraps_each_block_and_changes_no_number(tiny, small_world):
    _, plain, proc = tiny()
    _, checkpointed, _ = tiny("model.vision.gradient_checkpointing=true", "model.llm.gradient_checkpointing=true")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    blocks = checkpointed.blocks()
    assert len(blocks["vision"]) == 2 and len(blocks["llm"]) == 4
    assert all(isinstance(b, CheckpointWrapper) for name in ("vision", "llm") for b in blocks[name])
    assert not any(isinstance(m, CheckpointWrapper) for m in plain.modules())
    # Checkpoint names and state dicts are those of the plain model.
    assert checkpointed.named_trainable_parameters().keys() == plain.named_trainable_parameters().keys()
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    encoder = ConversationEncoder(proc.tokenizer, plain.num_image_tokens, "You are a helpful assistant.", 256)
    samples = [SampleProcessor(encoder, proc.image)({**r, "image_root": str(small_world)}) for r in RECORDS_WITH_0_1_2_IMAGES]
    batch = PadCollator(proc.tokenizer.pad_id)(samples)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                    labels=batch["labels"])
        out.loss_sum.backward()
        grads.append({n: p.grad for n, p in model.named_trainable_parameters().items()})
    assert max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0]) < 1e-6


# --------------------------------------------------------------------------- optimiser groups and schedule


def expected_decay(name: str) -> bool:
    """The rule, stated independently: no decay on biases, norms, embeddings and learned queries/positions."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("bias", "in_proj_bias", "pos_embed", "query") or "embed_tokens" in name:
        return False
    return not re.search(r"(^|\.)(norm\d?|ln_\w+|input_layernorm|post_attention_layernorm)\.weight$", name)


def test_weight_decay_groups(tiny):
    cfg, model, _ = tiny()
    groups = parameter_groups(model.components, 0.05)
    assert sorted(g["name"] for g in groups) == sorted([
        "vision.decay", "vision.no_decay", "adapter.decay", "adapter.no_decay", "llm.decay", "llm.no_decay"
    ])
    wd_of = {}
    for g in groups:
        assert g["weight_decay"] == (0.05 if g["name"].endswith(".decay") else 0.0) and g["lr_scale"] == 1.0
        for p in g["params"]:
            assert id(p) not in wd_of, "a parameter is in two groups"
            wd_of[id(p)] = g["weight_decay"]
    named = dict(model.named_parameters())
    assert len(wd_of) == len(named)  # every trainable parameter exactly once (tied lm_head counted once)
    for name, p in named.items():
        assert wd_of[id(p)] == (0.05 if expected_decay(name) else 0.0), name
    spot = {
        "adapter.query": 0.0, "adapter.proj": 0.05, "adapter.ln_q.weight": 0.0, "adapter.ln_post.bias": 0.0,
        "adapter.attn.in_proj_weight": 0.05, "adapter.attn.in_proj_bias": 0.0, "adapter.attn.out_proj.weight": 0.05,
        "vision.model.pos_embed": 0.0, "vision.model.patch_embed.proj.weight": 0.05,
        "vision.model.patch_embed.proj.bias": 0.0, "vision.model.blocks.0.norm1.weight": 0.0,
        "vision.model.blocks.0.attn.qkv.weight": 0.05, "vision.model.blocks.0.mlp.fc1.weight": 0.05,
        "vision.model.norm.weight": 0.0, "llm.model.embed_tokens.weight": 0.0,
        "llm.model.layers.0.self_attn.q_proj.weight": 0.05, "llm.model.layers.0.self_attn.q_proj.bias": 0.0,
        "llm.model.layers.0.mlp.down_proj.weight": 0.05, "llm.model.layers.0.input_layernorm.weight": 0.0,
        "llm.model.norm.weight": 0.0,
    }
    assert {k: wd_of[id(named[k])] for k in spot} == spot
    assert model.llm.get_output_embeddings().weight is named["llm.model.embed_tokens.weight"]  # tied: no decay

    opt = build_optimizer(model.components, cfg.run)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0] * 3 + [0.05] * 3
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6

    _, frozen, _ = tiny("model.freeze.vision=frozen")
    assert sorted(g["name"] for g in parameter_groups(frozen.components, 0.05)) == [
        "adapter.decay", "adapter.no_decay", "llm.decay", "llm.no_decay"
    ]


def test_linear_warmup_cosine_schedule():
    kw = {"max_steps": 110, "warmup_steps": 10, "lr": 1e-3, "min_lr": 1e-4}
    values = {s: linear_warmup_cosine(s, **kw) for s in (0, 4, 9, 10, 35, 60, 85, 109, 110, 200)}
    expected = {
        0: 1e-4,  # (step + 1) / warmup
        4: 5e-4,
        9: 1e-3,  # end of warm-up: the peak
        10: 1e-3,  # cosine starts at the peak
        35: 1e-4 + 0.9e-3 * 0.5 * (1 + 2**-0.5),  # a quarter of the way
        60: 5.5e-4,  # half way: the midpoint of lr and min_lr
        85: 1e-4 + 0.9e-3 * 0.5 * (1 - 2**-0.5),
        110: 1e-4,  # max_steps: min_lr
        200: 1e-4,  # beyond: stays at min_lr
    }
    for step, value in expected.items():
        assert values[step] == pytest.approx(value, rel=1e-12, abs=1e-15), step
    assert values[109] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)), rel=1e-12)
    after = [linear_warmup_cosine(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(after))  # non-increasing after warm-up
    # constant: warm-up, then flat
    assert [constant_with_warmup(s, **kw) for s in (0, 9, 10, 109)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])
    # no warm-up: starts at the peak
    assert linear_warmup_cosine(0, 100, 0, 1e-3, 1e-4) == pytest.approx(1e-3)


def test_runner_sets_the_scheduled_lr_on_every_group(load_sft):
    from lavis.runners import build_runner

    runner = build_runner(load_sft("run.max_steps=110", "run.warmup_steps=10", "run.lr=1e-3", "run.min_lr=1e-4"))
    for step in (0, 9, 60, 110):
        lr = runner.set_lr(step)
        assert lr == linear_warmup_cosine(step, 110, 10, 1e-3, 1e-4)
        assert [g["lr"] for g in runner.optimizer.param_groups] == [lr] * len(runner.optimizer.param_groups)
