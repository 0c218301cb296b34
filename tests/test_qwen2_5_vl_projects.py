"""projects/qwen2_5_vl/{finetune_full,finetune_lora}.yaml and the Qwen2.5-VL presets: they load and validate,
--print-config counts Qwen2.5-VL-7B-Instruct's released sizes on the meta device (no weights on disk), the
freeze policies train what qwen-vl-finetune's flags imply, and a tiny checkpoint trains two steps through each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_qwen2_vl import tiny_checkpoint
from PIL import Image

from lavis.common.config import load_config
from lavis.models import build_model
from lavis.processors.tokenizer import QWEN2_VL_SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
PROJECTS = {name: REPO / "projects" / "qwen2_5_vl" / f"{name}.yaml" for name in ("finetune_full", "finetune_lora")}
PRESETS = REPO / "configs" / "models" / "presets"
# Counting without a checkpoint: the placeholder directory is absent, every component takes its inline config.
NO_WEIGHTS = ()

# Qwen2.5-VL-7B-Instruct's architecture (its config.json), written out here rather than read from the preset.
VIT = {"width": 1280, "depth": 32, "mlp": 3420, "in_features": 3 * 2 * 14 * 14, "merge": 2, "out": 3584}
LLM = {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "mlp": 18944, "vocab": 152064}


def vit_parameters(width: int, depth: int, mlp: int, in_features: int) -> int:
    """Qwen2.5-VL's ViT less its merger: a bias-free patch embedding, then per block two RMSNorms, qkv and the
    output projection (with biases) and a SwiGLU MLP (gate, up, down, with biases)."""
    block = 2 * width + (width * 3 * width + 3 * width) + (width * width + width) + 2 * (width * mlp + mlp) + (mlp * width + width)
    return in_features * width + depth * block


def merger_parameters(width: int, merge: int, out: int) -> int:
    """Qwen2_5_VLPatchMerger: RMSNorm(width), Linear(m, m) and Linear(m, out) with biases, m = width * merge**2."""
    m = width * merge**2
    return width + (m * m + m) + (m * out + out)


def llm_parameters(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int, tied: bool = False) -> int:
    """Qwen2's decoder: q/k/v with biases, o without, a SwiGLU MLP without biases, two RMSNorms per layer; the
    embeddings, the final norm and (untied) lm_head."""
    kv = hidden // heads * kv_heads
    layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * mlp + 2 * hidden
    return layers * layer + vocab * hidden * (1 if tied else 2) + hidden


def lora_parameters(r: int, hidden: int, heads: int, kv_heads: int, layers: int) -> int:
    """LoRA's A (r x in) and B (out x r) on q, k, v and o_proj of every layer."""
    kv = hidden // heads * kv_heads
    return layers * r * ((hidden + hidden) + 2 * (hidden + kv) + (hidden + hidden))


EXPECTED = {
    "vision": vit_parameters(VIT["width"], VIT["depth"], VIT["mlp"], VIT["in_features"]),
    "adapter": merger_parameters(VIT["width"], VIT["merge"], VIT["out"]),
    "llm": llm_parameters(**LLM),
}


def counts(model) -> dict[str, tuple[int, int]]:
    """(total, trainable) parameters per component of a built model."""
    return {name: (sum(p.numel() for p in part.parameters()), sum(p.numel() for p in part.parameters() if p.requires_grad))
            for name, part in (("vision", model.vision), ("adapter", model.adapter), ("llm", model.llm))}


def test_the_release_sizes_computed_here_are_qwen2_5_vl_7b():
    """The architecture's arithmetic gives the published totals: ~0.68B for the vision side, 8.29B in all."""
    assert EXPECTED == {"vision": 631_975_680, "adapter": 44_574_464, "llm": 7_615_616_512}
    assert sum(EXPECTED.values()) == 8_292_166_656


@pytest.mark.parametrize("name", PROJECTS)
def test_projects_load_and_validate_with_the_recipe(name):
    """Both projects resolve (one path sets the ViT's and the tokenizer's) and carry qwen-vl-finetune's values."""
    cfg = load_config(PROJECTS[name], ["model.llm.pretrained=/ckpt/Qwen2.5-VL-7B-Instruct"])
    model, run = cfg.model, cfg.run
    assert model.vision.params["pretrained"] == model.tokenizer.params["path"] == "/ckpt/Qwen2.5-VL-7B-Instruct"
    assert model.tokenizer.params["special_tokens"] == QWEN2_VL_SPECIAL_TOKENS
    assert (model.adapter.type, model.adapter.params["norm"]) == ("patch_merger", "rmsnorm")
    assert (model.image_processor.params["min_pixels"], model.image_processor.params["max_pixels"]) == (784, 50176)
    assert (model.freeze.vision.type, model.freeze.adapter.type) == ("frozen", "trainable")
    assert cfg.datasets["conversations"].builder == "llava_conversation"
    assert (run.batch_size, run.grad_accum, run.max_len, run.weight_decay, run.precision) == (4, 4, 8192, 0.0, "bf16")
    lr = {part: run.lr * getattr(run.lr_scale, part) for part in ("vision", "adapter", "llm")}
    if name == "finetune_full":
        assert model.freeze.llm.type == "trainable"
        assert lr == pytest.approx({"vision": 1e-6, "adapter": 1e-5, "llm": 2e-7}, rel=1e-9)
    else:
        lora = model.freeze.llm
        assert lora.type == "lora" and (lora.params["r"], lora.params["alpha"], lora.params["dropout"]) == (64, 128, 0.05)
        assert lr["adapter"] == pytest.approx(1e-5, rel=1e-9)


@pytest.mark.parametrize("name", PROJECTS)
def test_meta_counts_are_qwen2_5_vl_7b_and_the_policies_train_what_the_recipe_implies(name):
    """On the meta device (no weights anywhere) every component has the release's size; full fine-tuning trains
    the merger and the whole LLM, LoRA the merger and the adapters on q, k, v and o_proj."""
    cfg = load_config(PROJECTS[name], list(NO_WEIGHTS))
    model, _ = build_model(cfg.model, meta=True)
    found = counts(model)
    if name == "finetune_full":
        assert found == {"vision": (EXPECTED["vision"], 0), "adapter": (EXPECTED["adapter"],) * 2, "llm": (EXPECTED["llm"],) * 2}
    else:
        adapters = lora_parameters(64, LLM["hidden"], LLM["heads"], LLM["kv_heads"], LLM["layers"])
        assert adapters == 40_370_176
        assert found == {"vision": (EXPECTED["vision"], 0), "adapter": (EXPECTED["adapter"],) * 2,
                         "llm": (EXPECTED["llm"] + adapters, adapters)}


def test_print_config_counts_the_full_project_without_weights():
    """`train.py --print-config` (the documented command) prints the release's counts and exits 0."""
    result = subprocess.run(
        [sys.executable, "train.py", "--cfg-path", str(PROJECTS["finetune_full"]), "--print-config"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line.split()[2:] for line in result.stdout.splitlines() if line.startswith("# ") and len(line.split()) > 3}
    assert rows["vision"] == ["frozen", f"{EXPECTED['vision']:,}", "0"]
    assert rows["adapter"] == ["trainable", f"{EXPECTED['adapter']:,}", f"{EXPECTED['adapter']:,}"]
    assert rows["llm"] == ["trainable", f"{EXPECTED['llm']:,}", f"{EXPECTED['llm']:,}"]


def test_other_presets_count_their_releases():
    """qwen2_5_vl_3b (tied embeddings, 2048-wide merger output) and qwen2_vl_7b (Qwen2-VL's ViT) on the meta device."""
    cfg = load_config(PRESETS / "qwen2_5_vl_3b.yaml", list(NO_WEIGHTS))
    three_b = counts(build_model(cfg.model, meta=True)[0])
    assert three_b["vision"][0] == EXPECTED["vision"]
    assert three_b["adapter"][0] == merger_parameters(VIT["width"], VIT["merge"], 2048)
    assert three_b["llm"][0] == llm_parameters(2048, 36, 16, 2, 11008, 151936, tied=True)
    cfg = load_config(PRESETS / "qwen2_vl_7b.yaml", list(NO_WEIGHTS))
    qwen2_vl = counts(build_model(cfg.model, meta=True)[0])
    assert sum(total for total, _ in qwen2_vl.values()) == 8_291_375_616  # Qwen2-VL-7B's published 8.29B
    assert qwen2_vl["llm"][0] == EXPECTED["llm"]


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2.5-VL checkpoint as released, and LLaVA-style JSON with three pictures."""
    root = tmp_path_factory.mktemp("qwen2_5_vl")
    checkpoint = tiny_checkpoint(root / "Qwen2.5-VL-tiny", "qwen2_5_vl", "released")
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, (w, h) in {"a.png": (84, 56), "b.png": (56, 112), "c.png": (60, 60)}.items():
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()).save(images / name)
    records = [
        {"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                        {"from": "gpt", "value": "Noise."}]},
        {"id": "1", "image": ["b.png", "c.png"], "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."},
                                                                   {"from": "gpt", "value": "The first is taller."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"id": "3", "image": "c.png", "conversations": [{"from": "human", "value": "Describe <image> briefly."},
                                                        {"from": "gpt", "value": "Square."},
                                                        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
    ]
    ann = root / "train.json"
    ann.write_text(json.dumps(records))
    return {"checkpoint": checkpoint, "images": images, "ann": ann, "root": root}


def tiny_options(release: dict[str, Path], output_dir: Path) -> list[str]:
    """The project at the tiny checkpoint's sizes (inline configs dropped: the checkpoint's config.json rules),
    on CPU in fp32, two steps of two samples."""
    return [
        f"model.llm.pretrained={release['checkpoint']}",
        "model.llm.config=null", "model.vision.config=null",  # sizes from the checkpoint, not the 7B's
        "model.vision.dtype=float32", "model.llm.dtype=float32",
        f"datasets.conversations.ann_path={release['ann']}", f"datasets.conversations.image_root={release['images']}",
        "run.device=cpu", "run.strategy=single", "run.precision=fp32", "run.num_workers=0",
        "run.batch_size=2", "run.grad_accum=1", "run.max_steps=2", "run.warmup_steps=1", "run.max_len=1024",
        "run.save_every=2", "run.log_every=1", f"run.output_dir={output_dir}",
    ]


@pytest.mark.parametrize("name", PROJECTS)
def test_a_tiny_checkpoint_trains_two_steps_through_the_project(name, tiny_release, tmp_path):
    """The project on a tiny released-layout checkpoint: the merger starts from the checkpoint's weights, two
    optimiser steps run, the ViT stays as loaded and the trained parts move."""
    from safetensors import safe_open

    from lavis.runners import build_runner
    from lavis.runners.strategies import build_strategy

    cfg = load_config(PROJECTS[name], tiny_options(tiny_release, tmp_path / "run"))
    cfg.check_local_paths()
    strategy = build_strategy(cfg.run.strategy)
    strategy.setup(cfg.run.device, cfg.run.dist_timeout_s)
    runner = build_runner(cfg, strategy)
    model = runner.model
    shard = sorted(tiny_release["checkpoint"].glob("model-*.safetensors"))
    merger = {}
    for file in shard:
        with safe_open(str(file), framework="pt") as f:
            merger.update({k.removeprefix("visual.merger."): f.get_tensor(k) for k in f.keys() if k.startswith("visual.merger.")})
    adapter = dict(model.adapter.named_parameters())
    assert merger.keys() == adapter.keys()
    assert all(torch.equal(adapter[k].detach(), v) for k, v in merger.items())  # not a random merger
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner.train()
    strategy.teardown()
    assert runner.step == 2
    after = dict(model.named_parameters())
    moved = {n.split(".", 1)[0] for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved == {"adapter", "llm"}  # the frozen ViT never changes
    if name == "finetune_lora":
        changed_llm = [n for n in before if n.startswith("llm.") and not torch.equal(before[n], after[n].detach())]
        assert changed_llm and all("lora_" in n for n in changed_llm)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if '"loss"' in line]
    assert len(steps) == 2 and all(step["skipped"] == 0 for step in steps)  # every record usable, images included
