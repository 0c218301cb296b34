"""projects/dpo.yaml, the demo's optional fourth stage: it validates, chains from an SFT run (model.load_from) as
the other stages chain, and trains a few steps on a small world's preference pairs, its loss starting at log 2
per pair (the reference is the starting model) plus the SFT term, finite throughout."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from test_stages import QUICK, ROOT, stage_options

from lavis.common.config import load_config
from lavis.runners import build_runner
from lavis.tasks.dpo import REFERENCE_CACHE
from lavis.tracking.logging import read_metrics

pytestmark = pytest.mark.integration

DPO_PROJECT = ROOT / "projects" / "dpo.yaml"


def dpo_options(world: Path, out: Path, *extra: str) -> list[str]:
    """Point projects/dpo.yaml at ``world`` (its preference_train.json) and make it small, quick and CPU-only."""
    w = str(world)
    return [f"datasets.synthetic_preference.ann_path={w}/preference_train.json",
            f"datasets.synthetic_preference.image_root={w}", f"datasets.synthetic_preference.synthetic_root={w}",
            f"evaluation.heldout_pairs.ann_path={w}/preference_val.json", f"evaluation.heldout_pairs.image_root={w}",
            f"evaluation.heldout_pairs.synthetic_root={w}",
            *QUICK, "run.batch_size=4", f"run.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def sft_run(small_world, tmp_path_factory) -> Path:
    """A run directory of projects/sft.yaml after 2 steps (full weights, as the project saves them)."""
    out = tmp_path_factory.mktemp("stages") / "sft"
    build_runner(load_config(ROOT / "projects" / "sft.yaml",
                             stage_options("sft", small_world, out, "run.max_steps=2", "run.save_every=2"))).train()
    assert (out / "checkpoints" / "step_00000002" / "model.safetensors").exists()
    return out


def test_the_project_is_the_stage_after_sft(sft_run, small_world, tmp_path):
    as_shipped = load_config(DPO_PROJECT)
    assert as_shipped.model.load_from == "outputs/sft" and as_shipped.run.output_dir == "outputs/dpo"
    assert as_shipped.run.save_weights == "full"
    sft = load_config(ROOT / "projects" / "sft.yaml")
    assert vars(as_shipped.model.freeze) == vars(sft.model.freeze)  # the SFT stage's freeze policy

    cfg = load_config(DPO_PROJECT, [f"run.output_dir={tmp_path / 'dpo'}", f"model.load_from={sft_run}"])
    assert cfg.run.task == "dpo" and cfg.model.load_from == str(sft_run)
    (data,) = cfg.datasets.values()
    assert data.builder == "qwen_vl_preference" and data.params["ann_path"] == "data/synthetic/preference_train.json"
    dpo = cfg.run.dpo
    assert dpo.beta == pytest.approx(0.1) and 0 <= dpo.sft_weight < 1 and dpo.label_smoothing == 0
    assert dpo.reference == "frozen_copy"  # computed once (precompute_ref) or by a copy every step
    assert 1e-6 <= cfg.run.lr <= 1e-4 < sft.run.lr and cfg.run.max_steps <= 500
    assert cfg.model.system_message == sft.model.system_message  # the SFT stage's ChatML conversations
    held_out = as_shipped.evaluation["heldout_pairs"]  # the val split's pairs, scored during training
    assert held_out.task == "heldout_loss" and held_out.builder_params["ann_path"] == "data/synthetic/preference_val.json"
    assert as_shipped.run.eval_every and as_shipped.run.eval_every < as_shipped.run.max_steps


def test_the_stage_trains_from_an_sft_run(sft_run, small_world, tmp_path, caplog):
    out = tmp_path / "dpo"
    cfg = load_config(DPO_PROJECT, dpo_options(small_world, out, f"model.load_from={sft_run}", "run.max_steps=3",
                                               "run.save_every=3", "run.eval_every=3"))
    with caplog.at_level(logging.INFO):
        build_runner(cfg).train()
    assert f"model.load_from {sft_run}" in caplog.text
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "rewards/margins", "nll_loss"))
    # Step 1: the policy is its reference, every reward 0 and the DPO term log 2 per pair; the SFT term beside it.
    first = records[0]
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4
    assert first["loss"] - cfg.run.dpo.sft_weight * first["nll_loss"] == pytest.approx(math.log(2), abs=1e-4)
    if cfg.run.dpo.precompute_ref:  # the reference of every pair of the small world, computed once
        assert f"computed and saved to {out / REFERENCE_CACHE}" in caplog.text
        assert (out / REFERENCE_CACHE).exists()
    assert (out / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    (held_out,) = [r for r in read_metrics(out / "metrics.jsonl") if "eval/heldout_pairs/pair_accuracy" in r]
    assert held_out["step"] == 3 and 0 <= held_out["eval/heldout_pairs/pair_accuracy"] <= 1


def test_the_demo_script_reads_an_evaluation_into_one_row(small_world, tmp_path, capsys):
    """scripts/dpo_demo.py's table: VQA by question type, CHAIR over the captions against their scenes, CIDEr and
    grounding, from an evaluation directory's files (written here by hand, answers known)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_demo", ROOT / "scripts" / "dpo_demo.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    scenes = json.loads((small_world / "scenes_test.json").read_text())
    annotations = json.loads((small_world / "vqa_annotations_test.json").read_text())["annotations"][:2]
    first = scenes[0]["objects"][0]
    absent = next(c for c in ("red", "green", "blue", "yellow", "purple", "orange")
                  if all(o["colour"] != c for o in scenes[0]["objects"]))
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "vqa.json").write_text(json.dumps({"metrics": {"accuracy": 0.5}, "predictions": [
        {"id": str(a["question_id"]), "prediction": a["multiple_choice_answer"] if k == 0 else "no such answer",
         "answers": [x["answer"] for x in a["answers"]]} for k, a in enumerate(annotations)]}))
    caption = f"a {first['colour']} {first['shape']} and a {absent} {first['shape']}"  # one of two objects absent
    (eval_dir / "caption.json").write_text(json.dumps({"metrics": {"CIDEr": 1.5}, "predictions": [
        {"image": scenes[0]["image"], "prediction": caption}]}))
    (eval_dir / "grounding.json").write_text(json.dumps({"metrics": {"accuracy": 0.25}}))
    figures = gap.row(eval_dir, small_world)
    assert figures["all"] == 0.5 and (figures["CHAIR_i"], figures["CHAIR_s"], figures["mentioned"]) == (0.5, 1.0, 2)
    assert (figures["CIDEr"], figures["grounding"]) == (1.5, 0.25)
    types = [a["question_type"] for a in annotations]
    expected = {types[0]: [1.0], types[1]: []}
    expected[types[1]].append(0.0)  # the first answered right, the second wrong
    assert {t: figures[t] for t in expected} == {t: sum(v) / len(v) for t, v in expected.items()}
    assert gap.main(["--compare", str(eval_dir), "--world", str(small_world)]) == 0
    assert "| 0.500 |" in capsys.readouterr().out
