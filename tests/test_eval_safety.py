"""evaluate.py evaluates the model that was trained, and its results are never lost (issue 18, items 2-3).

- The model is built from the run's own config.yaml: a run trained with a key that changes no tensor
  shape (rope_theta) is evaluated with the run's value, not the evaluation project's; an explicit
  evaluation key that contradicts the run is an error naming both values, unless model.override lists it.
- Results go to <run>/eval/<checkpoint>/<project>/ (outside the checkpoints, which are pruned), also for
  a weights file; a second evaluation into a directory with results is refused, or moved aside with
  run.overwrite; a results directory inside a checkpoint or through a file is refused at start.
- An evaluation whose every sample was skipped has no score: its row reads n/a and the exit is 1.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import REPO, TINY_PRESET, run_train, sft_options

pytestmark = pytest.mark.integration

ROPE = 12345.0  # the run's rope_theta; the tiny preset (the evaluation project's base) says 10000.0


@pytest.fixture(scope="module")
def rope_run(small_world, tmp_path_factory) -> Path:
    """A one-step run whose LLM differs from the tiny preset in rope_theta only (no tensor shape changes)."""
    out = tmp_path_factory.mktemp("rope_run") / "sft"
    result = run_train(sft_options(small_world, out, "run.max_steps=1", "run.save_every=1", "run.save_weights=full",
                                   f"model.llm.config.rope_theta={ROPE}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def project(path: Path, world: Path, image_root: Path | None = None, **run) -> Path:
    """An evaluation project over the tiny preset: vqa (3 questions) and grounding (2); no run.output_dir."""
    root = str(image_root or world)
    data = {
        "base": [str(TINY_PRESET)],
        "evaluation": {
            "vqa": {"task": "vqa", "builder": "vqa", "ann_path": str(world / "vqa_val.jsonl"), "image_root": root,
                    "max_samples": 3},
            "grounding": {"task": "grounding", "builder": "ref_grounding", "ann_path": str(world / "refs_val.json"),
                          "image_root": str(world), "max_samples": 2},
        },
        "run": {"device": "cpu", "eval_batch_size": 4, **run},
    }
    path.write_text(json.dumps(data))
    return path


def checkpoint_of(run: Path) -> Path:
    (checkpoint,) = sorted((run / "checkpoints").glob("step_*"))
    return checkpoint


# --------------------------------------------------------------------------- item 2: the model evaluated


def test_the_model_is_built_from_the_runs_config(rope_run, small_world, tmp_path):
    from lavis.common.config import load_config
    from lavis.models.loading import build_trained, evaluation_config, explicit_keys

    cfg_path = project(tmp_path / "eval.yaml", small_world)
    options = [f"model.load_from={rope_run}"]
    cfg = load_config(cfg_path, options)
    assert cfg.model.llm.params["config"]["rope_theta"] == 10000.0  # what today's evaluate.py built
    cfg, config = evaluation_config(cfg, explicit_keys(cfg_path, options))
    assert config.name == "config.yaml" and config.is_relative_to(rope_run)  # the checkpoint's own copy
    assert cfg.model.llm.params["config"]["rope_theta"] == ROPE
    model, _ = build_trained(cfg.model, cfg.model.load_from)
    llm_config = model.llm.config
    assert (llm_config.rope_parameters["rope_theta"] if hasattr(llm_config, "rope_parameters") else llm_config.rope_theta) == ROPE


def test_an_explicit_contradiction_is_an_error_naming_both_values(rope_run, small_world, tmp_path, evaluate, capsys):
    cfg_path = project(tmp_path / "eval.yaml", small_world)
    code = evaluate(["--cfg-path", str(cfg_path), "--options", f"model.load_from={rope_run}",
                     "model.llm.config.rope_theta=20000.0", f"run.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.llm.config.rope_theta: 20000.0 here (--options), 12345.0 in" in err
    assert f"{rope_run}/checkpoints/step_00000001/config.yaml" in err
    assert "model.override" in err
    assert not (tmp_path / "out").exists()


def test_an_image_size_change_needs_model_override(rope_run, small_world, tmp_path, evaluate, capsys):
    cfg_path = project(tmp_path / "eval.yaml", small_world)
    sizes = ["model.vision.image_size=96", "model.image_processor.image_size=96"]
    base = ["--cfg-path", str(cfg_path), "--options", f"model.load_from={rope_run}", *sizes]
    assert evaluate([*base, f"run.output_dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err
    assert "model.vision.image_size: 96 here (--options), 64 in" in err
    assert "model.image_processor.image_size: 96 here (--options), 64 in" in err
    override = "model.override=[vision.image_size,image_processor.image_size]"
    assert evaluate([*base, override, f"run.output_dir={tmp_path / 'out'}"]) == 0
    assert json.loads((tmp_path / "out" / "eval" / "vqa.json").read_text())["metrics"]["count"] == 3


def test_model_override_names_a_key_of_the_model(rope_run, small_world, tmp_path, evaluate, capsys):
    cfg_path = project(tmp_path / "eval.yaml", small_world)
    assert evaluate(["--cfg-path", str(cfg_path), "--options", f"model.load_from={rope_run}",
                     "model.override=[vision.image_sise]"]) == 2
    assert "model.override: 'vision.image_sise' is not a key" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 3: where results go


def test_results_of_a_checkpoint_are_outside_it_and_a_rerun_is_refused(rope_run, small_world, tmp_path, evaluate, capsys):
    checkpoint = checkpoint_of(rope_run)
    cfg_path = project(tmp_path / "mine.yaml", small_world)
    args = ["--cfg-path", str(cfg_path), "--options", f"model.load_from={checkpoint}"]
    assert evaluate(args) == 0
    out = rope_run / "eval" / checkpoint.name / "mine"
    assert sorted(p.name for p in out.iterdir()) == ["grounding.json", "results.json", "results.md", "vqa.json"]
    assert not (checkpoint / "eval").exists()
    first = {p.name: p.read_text() for p in out.iterdir()}

    # A second evaluation (fewer questions, one task) is refused: nothing of the first is replaced.
    capsys.readouterr()
    assert evaluate([*args, "evaluation.vqa.max_samples=1", "evaluation.grounding=null"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds an earlier evaluation (" in err and "run.overwrite=true" in err and "run.output_dir" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == first

    # run.overwrite moves the first aside (never deleted) and writes afresh.
    assert evaluate([*args, "evaluation.vqa.max_samples=1", "evaluation.grounding=null", "run.overwrite=true"]) == 0
    (aside,) = out.parent.glob("mine.old-*")
    assert {p.name: p.read_text() for p in aside.iterdir()} == first
    assert json.loads((out / "vqa.json").read_text())["metrics"]["count"] == 1 and not (out / "grounding.json").exists()


def test_a_weights_file_evaluates_every_task(rope_run, small_world, tmp_path, evaluate):
    """Today the demo projects' output_dir is ${model.load_from}: the weights file itself, and the second task crashes."""
    weights = checkpoint_of(rope_run) / "model.safetensors"
    cfg_path = project(tmp_path / "weights.yaml", small_world)
    assert evaluate(["--cfg-path", str(cfg_path), "--options", f"model.load_from={weights}"]) == 0
    out = rope_run / "eval" / weights.parent.name / "weights"
    assert {r["evaluation"] for r in json.loads((out / "results.json").read_text())["results"]} == {"vqa", "grounding"}
    assert weights.is_file()


@pytest.mark.parametrize("where", ["checkpoint", "weights", "run"])
def test_a_results_directory_that_is_not_safe_is_refused_at_start(rope_run, small_world, tmp_path, evaluate, capsys, where):
    checkpoint = checkpoint_of(rope_run)
    output_dir = {"checkpoint": checkpoint, "weights": checkpoint / "model.safetensors", "run": rope_run}[where]
    message = {"checkpoint": "lies inside the checkpoint", "weights": "is a file", "run": "is the training run's own"}[where]
    cfg_path = project(tmp_path / "eval.yaml", small_world)
    assert evaluate(["--cfg-path", str(cfg_path), "--options", f"model.load_from={checkpoint}",
                     f"run.output_dir={output_dir}"]) == 2
    assert message in capsys.readouterr().err
    assert not (checkpoint / "eval").exists()


def test_the_demo_projects_write_outside_the_model(small_world):
    """No shipped evaluation project writes its results into the model it evaluates."""
    from lavis.models.loading import explicit_keys

    for name in ("caption", "vqa", "grounding", "demo"):
        assert "run.output_dir" not in explicit_keys(REPO / "projects" / "eval" / f"{name}.yaml")


# --------------------------------------------------------------------------- item 3: no score is not 0.0


def test_an_evaluation_with_every_sample_skipped_is_an_error_not_a_score(rope_run, small_world, tmp_path, evaluate, capsys):
    empty = tmp_path / "no_images"
    empty.mkdir()
    cfg_path = project(tmp_path / "eval.yaml", small_world, image_root=empty)
    out = tmp_path / "out"
    code = evaluate(["--cfg-path", str(cfg_path), "--options", f"model.load_from={rope_run}", f"run.output_dir={out}"])
    captured = capsys.readouterr()
    assert code == 1
    assert "evaluation vqa: every one of its 3 samples was skipped (by reason: missing_image 3)" in captured.err
    assert "evaluation grounding" not in captured.err
    rows = {r["evaluation"]: r for r in json.loads((out / "eval" / "results.json").read_text())["results"]}
    assert rows["vqa"]["value"] is None and rows["vqa"]["samples"] == 0 and rows["vqa"]["skipped"] == 3
    assert isinstance(rows["grounding"]["value"], float) and rows["grounding"]["samples"] == 2
    assert "| vqa | - | accuracy | n/a | 0 | 3 |" in (out / "eval" / "results.md").read_text()
    saved = json.loads((out / "eval" / "vqa.json").read_text())
    assert "accuracy" not in saved["metrics"] and "every one of its 3 samples" in saved["error"]
