"""Qwen-VL's stages: freeze tables, chaining with model.load_from, resolution change, lr scales."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from lavis.common.config import load_config
from lavis.models import build_model
from lavis.models.weights import load_stage_checkpoint
from lavis.runners import build_runner

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PAPER_FREEZE = {  # DESIGN §7
    "pretrain": {"vision": "trainable", "adapter": "trainable", "llm": "frozen"},
    "multitask": {"vision": "trainable", "adapter": "trainable", "llm": "trainable"},
    "sft": {"vision": "frozen", "adapter": "trainable", "llm": "trainable"},
}
# The demo's LLM starts random (no pretrained LLM offline), and a frozen random LLM teaches the vision
# side nothing, so the demo's stage 1 trains it too; stages 2 and 3 are the paper's.
FREEZE_TABLE = {**PAPER_FREEZE, "pretrain": {**PAPER_FREEZE["pretrain"], "llm": "trainable"}}
QUICK = ["run.device=cpu", "run.num_workers=0", "run.log_every=1", "run.warmup_steps=1"]


def stage_options(stage: str, world: Path, out: Path, *extra: str) -> list[str]:
    """Point a demo stage's project at the small world."""
    w = str(world)
    data = {
        "pretrain": [f"datasets.synthetic_captions.shards={w}/shards/train-000000.tar",
                     f"datasets.synthetic_captions.synthetic_root={w}"],
        "multitask": [f"datasets.captions.ann_path={w}/captions_train.json",
                      f"datasets.vqa.question_path={w}/vqa_questions_train.json",
                      f"datasets.vqa.ann_path={w}/vqa_annotations_train.json",
                      f"datasets.refs.ann_path={w}/refs_train.json",
                      f"datasets.grounded_captions.ann_path={w}/grounded_captions_train.json",
                      f"datasets.ocr.ann_path={w}/ocr_train.json", f"datasets.text.ann_path={w}/text.jsonl",
                      f"datasets.captions.synthetic_root={w}", "run.max_len=384", "run.batch_size=2"]
        + [f"datasets.{d}.image_root={w}" for d in ("captions", "vqa", "refs", "grounded_captions", "ocr")],
        "sft": [f"datasets.synthetic_sft.ann_path={w}/sft_train.json", f"datasets.synthetic_sft.image_root={w}",
                f"datasets.synthetic_sft.synthetic_root={w}", "run.max_len=256"],
    }[stage]
    return [*data, *QUICK, "run.batch_size=4" if stage != "multitask" else "run.pack=true",
            f"run.output_dir={out}", *extra]


def policies(cfg) -> dict[str, str]:
    return {component: block.type for component, block in vars(cfg.model.freeze).items()}


@pytest.mark.parametrize("stage", FREEZE_TABLE)
def test_each_demo_stage_has_its_freeze_policy(stage):
    cfg = load_config(ROOT / "projects" / f"{stage}.yaml")
    assert policies(cfg) == FREEZE_TABLE[stage]
    # The full-scale projects follow the paper, and the demo is one override away from it.
    assert policies(load_config(ROOT / "projects" / "qwen_vl" / f"{stage}.yaml")) == PAPER_FREEZE[stage]
    options = [f"model.freeze.{component}={policy}" for component, policy in PAPER_FREEZE[stage].items()]
    assert policies(load_config(ROOT / "projects" / f"{stage}.yaml", options)) == PAPER_FREEZE[stage]


def test_three_stages_chain_with_interpolated_positions(small_world, tmp_path, caplog):
    outs = {stage: tmp_path / stage for stage in FREEZE_TABLE}
    previous = None
    for stage in FREEZE_TABLE:
        extra = ["run.max_steps=3", "run.save_every=3"]
        if stage == "pretrain":  # a smaller resolution first, as Qwen-VL's stage 1 (224 px, then 448)
            extra.append("model.vision.image_size=48")
        if previous:
            extra.append(f"model.load_from={outs[previous]}")
        cfg = load_config(ROOT / "projects" / f"{stage}.yaml", stage_options(stage, small_world, outs[stage], *extra))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            runner = build_runner(cfg)
            report = runner.model.parameter_report()
            runner.train()
        # The logged table shows which components trained, as the freeze table says.
        for component, policy in FREEZE_TABLE[stage].items():
            row = re.search(rf"^{component}\s+(\w+)\s+([\d,]+)\s+([\d,]+)$", report, re.M)
            assert row.group(1) == policy
            assert (row.group(3) == "0") == (policy == "frozen")
        assert f"parameters:\n{report}" in caplog.text
        if previous:
            assert f"model.load_from {outs[previous]}" in caplog.text
        if stage == "multitask":  # 48 px (6x6 patches) -> 64 px (8x8)
            assert "interpolated vision.model.pos_embed from a 6x6 to a 8x8 patch grid" in caplog.text
        assert (outs[stage] / "checkpoints" / "step_00000003" / "model.safetensors").exists()
        previous = stage


def test_resolution_change_interpolates_vit_positions_and_runs(load_sft, tmp_path):
    small = load_sft("model.vision.image_size=32", "model.freeze.vision=trainable")
    torch.manual_seed(0)
    model_32, _ = build_model(small.model)
    weights = tmp_path / "stage.safetensors"
    save_file({k: v.detach().clone() for k, v in model_32.named_parameters()}, str(weights))

    large = load_sft("model.vision.image_size=64", f"model.load_from={weights}")
    model_64, processors = build_model(large.model)
    pos_32 = model_32.vision.model.pos_embed  # 4x4 grid
    pos_64 = model_64.vision.model.pos_embed  # 8x8 grid
    assert pos_32.shape == (1, 16, 128) and pos_64.shape == (1, 64, 128)
    expected = resample_abs_pos_embed(pos_32.detach(), new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=0)
    assert torch.allclose(pos_64, expected)
    assert torch.equal(model_64.vision.model.blocks[0].attn.qkv.weight, model_32.vision.model.blocks[0].attn.qkv.weight)
    assert torch.equal(model_64.adapter.query, model_32.adapter.query)

    feats, grid = model_64.vision(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 64, 128) and grid == (8, 8)
    out = model_64.encode_images(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 36, 128)  # the resampler's keys follow the 8x8 grid; 36 queries out
    assert model_64.adapter.key_pos_embed(grid).shape == (64, 128)
    assert processors.image.image_size == 64


def test_load_from_reports_and_refuses(load_sft, tmp_path, caplog):
    cfg = load_sft()
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    adapter_only = tmp_path / "adapter.safetensors"
    save_file({k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("adapter.")}, str(adapter_only))
    torch.manual_seed(1)
    other, _ = build_model(cfg.model)
    with caplog.at_level(logging.INFO, logger="lavis.models"):
        load_stage_checkpoint(other, str(adapter_only))
    assert torch.equal(other.adapter.query, model.adapter.query)
    assert not torch.equal(other.llm.model.embed_tokens.weight, model.llm.model.embed_tokens.weight)
    assert "loaded {'adapter': 12}; not in the checkpoint (kept as built): {'vision': 29, 'llm': 50}" in caplog.text

    stray = tmp_path / "stray.safetensors"
    save_file({"adapter.query": model.adapter.query.detach().clone(), "adapter.extra": torch.zeros(2)}, str(stray))
    with pytest.raises(ValueError, match=r"1 keys are not in this model, e.g. \['adapter.extra'\]"):
        load_stage_checkpoint(other, str(stray))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"adapter.query": torch.zeros(4, 4)}, str(wrong))
    with pytest.raises(ValueError, match=r"shapes do not match this model: \['adapter.query: \(4, 4\) vs \(36, 128\)'\]"):
        load_stage_checkpoint(other, str(wrong))
    with pytest.raises(FileNotFoundError, match="model.load_from: no checkpoint at"):
        load_stage_checkpoint(other, str(tmp_path / "nothing"))


def test_missing_load_from_is_an_error_for_train_py(small_world, tmp_path):
    from train import main

    options = stage_options("sft", small_world, tmp_path / "out", f"model.load_from={tmp_path / 'no_stage_2'}")
    assert main(["--cfg-path", str(ROOT / "projects" / "sft.yaml"), "--options", *options]) == 2


def test_layer_decay_and_component_scales_reach_the_optimiser(load_sft):
    cfg = load_sft("run.layer_decay=0.8", "run.lr_scale.vision=0.5", "run.lr_scale.adapter=2.0", "run.lr=1e-3",
                   "run.warmup_steps=1")
    runner = build_runner(cfg)
    lr = runner.set_lr(5)
    depth = runner.model.vision.num_layers
    assert depth == 2
    group_of = {id(p): g for g in runner.optimizer.param_groups for p in g["params"]}

    def effective(param):
        return group_of[id(param)]["lr"]

    blocks = runner.model.vision.model.blocks
    assert effective(blocks[0].attn.qkv.weight) == pytest.approx(lr * 0.5 * 0.8 ** depth)      # first block
    assert effective(blocks[-1].attn.qkv.weight) == pytest.approx(lr * 0.5 * 0.8 ** 1)        # last block
    assert effective(runner.model.vision.model.patch_embed.proj.weight) == pytest.approx(lr * 0.5 * 0.8 ** (depth + 1))
    assert effective(runner.model.vision.model.norm.weight) == pytest.approx(lr * 0.5)
    assert effective(runner.model.adapter.query) == pytest.approx(lr * 2.0)
    assert effective(runner.model.llm.model.layers[0].mlp.up_proj.weight) == pytest.approx(lr)
    # weight decay still follows the parameter kind inside the layer groups
    assert group_of[id(blocks[0].attn.qkv.bias)]["weight_decay"] == 0.0
    assert group_of[id(blocks[0].attn.qkv.weight)]["weight_decay"] == cfg.run.weight_decay


@pytest.mark.parametrize("stage", ["pretrain", "multitask", "sft"])
def test_full_scale_projects_count_parameters_on_the_meta_device(stage):
    proc = subprocess.run(
        [sys.executable, "train.py", "--cfg-path", f"projects/qwen_vl/{stage}.yaml", "--print-config",
         "--options", "run.world_size_hint=64"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {m.group(1): (m.group(2), int(m.group(3).replace(",", "")), int(m.group(4).replace(",", "")))
            for m in re.finditer(r"^# (\w+)\s+(\w+)\s+([\d,]+)\s+([\d,]+)$", proc.stdout, re.M)}
    policy, vision, vision_trainable = rows["vision"]
    assert 1.8e9 < vision < 2.0e9                      # ViT-bigG/14 at 448 px, class token dropped
    assert 7.5e9 < rows["llm"][1] < 8.0e9              # Qwen-7B class
    assert 0.08e9 < rows["adapter"][1] < 0.1e9         # 256 queries, 4096 wide
    for component, expected in PAPER_FREEZE[stage].items():
        assert rows[component][0] == expected
        assert (rows[component][2] == 0) == (expected == "frozen")
    assert "built on the meta device" in proc.stdout
    # Per-rank memory under FSDP at 64 ranks: fp32 parameters (all), gradients and 2 AdamW moments
    # (trainable ones), each split 64 ways.
    assert "# per-rank memory at 64 rank(s), run.strategy=fsdp, run.precision=bf16" in proc.stdout
    gib = {m.group(1): float(m.group(2)) for m in re.finditer(r"^#   (\S.*?)\s+([\d.]+) GiB$", proc.stdout, re.M)}
    total, trainable = (sum(row[k] for row in rows.values()) for k in (1, 2))
    assert gib["parameters"] == pytest.approx(4 * total / 64 / 2**30, abs=0.006)
    assert gib["gradients"] == pytest.approx(4 * trainable / 64 / 2**30, abs=0.006)
    assert gib["AdamW state"] == pytest.approx(8 * trainable / 64 / 2**30, abs=0.006)
    assert 0.5 < gib["+ gathered units (transient)"] < 5
