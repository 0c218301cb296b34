"""Experiment tracking: W&B (offline) and TensorBoard get a run's config, its metrics, its evaluation
tables and sample predictions with their images; read back with each tool's own reader. Only the main
process logs. (Mistyped keys of run.wandb and run.tensorboard: tests/test_registry_config.py.)"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, SFT_PROJECT, eval_options, sft_options, train_command
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lavis.common.config import CONFIG_ROOT, RunConfig, TensorBoardConfig, WandbConfig
from lavis.common.registry import registry
from lavis.runners.strategies import SingleProcess
from lavis.tracking.loggers import TensorBoardLogger
from lavis.tracking.logging import MetricsWriter, NullMetricsWriter, read_metrics
from lavis.tracking.tables import SAMPLE_COLUMNS, TABLE_COLUMNS

SHORT_RUN = ("run.max_steps=3", "run.eval_every=2", "run.save_every=1000")  # evaluations at steps 2 and 3


def offline_wandb_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline and silent, every file it writes under ``tmp_path`` (the suite's default is disabled)."""
    home = tmp_path / "wandb-home"
    (home / "wandb").mkdir(parents=True)  # where the wandb CLI logs (without it: the system's temp directory)
    dirs = {"WANDB_DIR": home, "WANDB_DATA_DIR": home / "data", "WANDB_CACHE_DIR": home / "cache", "WANDB_CONFIG_DIR": home / "config"}
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **{k: str(v) for k, v in dirs.items()}}


def wandb_records(run_file: Path, env: dict[str, str]) -> list[dict]:
    """The records of a ``.wandb`` transaction log, read by wandb's own reader (``wandb leet inspect``)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                          capture_output=True, text=True, env=env, timeout=60, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def tensorboard_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


def text_at(events: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


def world_pixels(world: Path, prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(world / prediction["image"]).convert("RGB"))


# --------------------------------------------------------------------------- W&B


@pytest.mark.integration
def test_wandb_offline_run_holds_the_config_metrics_results_tables_and_sample_images(small_world, tmp_path):
    out = tmp_path / "out"
    options = sft_options(small_world, out, *eval_options(small_world, "vqa", max_samples=2), *SHORT_RUN,
                          "run.wandb.project=lavis-test", "run.wandb.tags=[ci]")
    env = offline_wandb_env(tmp_path)
    proc = subprocess.run(train_command(options), cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")  # dir=run.output_dir
    records = wandb_records(run_file, env)

    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "lavis-test" and run["tags"] == ["ci"]
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == yaml.safe_load((out / "config.yaml").read_text())  # the run's resolved config

    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    metrics = read_metrics(out / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    accuracy = {r["step"]: r["eval/vqa/accuracy"] for r in metrics if "eval/vqa/accuracy" in r}
    assert sorted(losses) == sorted(history) == [1, 2, 3] and sorted(accuracy) == [2, 3]
    for step, loss in losses.items():
        assert history[step]["loss"] == pytest.approx(loss, rel=1e-12)
        assert history[step]["lr"] == pytest.approx(next(r["lr"] for r in metrics if r["step"] == step), rel=1e-12)
    run_files = run_file.parent / "files"
    for step, value in accuracy.items():
        assert history[step]["eval/vqa/accuracy"] == value and history[step]["eval/vqa/count"] == 2
        results = json.loads((run_files / history[step]["eval/results.path"]).read_text())
        assert results == {"columns": list(TABLE_COLUMNS), "data": [["vqa", "-", "accuracy", value, 2, 0]]}
        assert history[step]["eval/samples/vqa.nrows"] == 2

    # The last evaluation's samples are the first predictions of eval/vqa.json (written at step 3).
    predictions = json.loads((out / "eval" / "vqa.json").read_text())["predictions"]
    samples = json.loads((run_files / history[3]["eval/samples/vqa.path"]).read_text())
    assert samples["columns"] == list(SAMPLE_COLUMNS)
    for row, prediction in zip(samples["data"], predictions, strict=True):
        cells = dict(zip(SAMPLE_COLUMNS, row, strict=True))
        columns = ("id", "prompt", "output", "prediction")
        assert [cells[c] for c in columns] == [prediction[c] for c in columns]
        assert json.loads(cells["reference"]).items() <= prediction.items()  # the answers, the question, the image

    # The images travel in the table's artifact: a PNG of the sample's image, pixel for pixel.
    manifests = [r["artifact"]["manifest"]["contents"] for r in records if r["type"] == "artifact"]
    last = [{e["path"]: Path(e["local_path"]) for e in m} for m in manifests
            if any(e["path"] == "eval/samples/vqa.table.json" for e in m)][-1]
    table = json.loads(last["eval/samples/vqa.table.json"].read_text())
    images = [row[SAMPLE_COLUMNS.index("image")] for row in table["data"]]
    assert [image["_type"] for image in images] == ["image-file"] * 2
    for image, prediction in zip(images, predictions, strict=True):
        assert np.array_equal(np.asarray(Image.open(last[image["path"]]).convert("RGB")), world_pixels(small_world, prediction))


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_hold_the_metrics_results_table_and_samples(load_sft, small_world, tmp_path):
    from lavis.runners import build_runner

    cfg = load_sft(*eval_options(small_world, "vqa", max_samples=2), *SHORT_RUN, "run.tensorboard.log_dir=tb")
    build_runner(cfg).train()
    out = Path(cfg.run.output_dir)
    events = tensorboard_events(out / "tb")  # a relative log_dir lies under run.output_dir
    metrics = read_metrics(out / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    accuracy = [(r["step"], r["eval/vqa/accuracy"]) for r in metrics if "eval/vqa/accuracy" in r]
    assert [(e.step, e.value) for e in events.Scalars("eval/vqa/accuracy")] == accuracy and len(accuracy) == 2

    tables = text_at(events, "eval/results")
    assert sorted(tables) == [2, 3]
    header = "| benchmark | split | metric | value | samples | skipped |\n|---|---|---|---|---|---|\n"
    assert tables[3] == header + f"| vqa | - | accuracy | {accuracy[-1][1]:.4f} | 2 | 0 |"
    predictions = json.loads((out / "eval" / "vqa.json").read_text())["predictions"]
    samples = text_at(events, "eval/samples/vqa")[3].splitlines()
    assert samples[0] == "| " + " | ".join(SAMPLE_COLUMNS) + " |" and len(samples) == 4
    assert "&lt;img&gt;images/val/" in samples[2]  # the prompt's image tag shown as text, not rendered
    assert f"| {predictions[0]['prediction']} |" in samples[2]
    for index, prediction in enumerate(predictions):
        (image,) = [e for e in events.Images(f"eval/samples/vqa/{index}") if e.step == 3]
        pixels = world_pixels(small_world, prediction)
        assert (image.height, image.width) == pixels.shape[:2]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), pixels)
    assert "max_steps: 3" in text_at(events, "config")[0]


@pytest.mark.integration
def test_evaluate_py_logs_its_table_and_samples(small_world, tmp_path):
    out = tmp_path / "out"
    options = sft_options(small_world, out, *eval_options(small_world, "vqa", max_samples=2), "run.tensorboard.log_dir=tb")
    proc = subprocess.run([sys.executable, "evaluate.py", "--cfg-path", str(SFT_PROJECT), "--options", *options],
                          cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = tensorboard_events(out / "tb")
    summary = (out / "eval" / "results.md").read_text()
    assert text_at(events, "eval/results") == {0: summary.split("\n\n", 1)[1].rstrip("\n")}  # results.md's table
    count = json.loads((out / "eval" / "vqa.json").read_text())["metrics"]["count"]
    assert [(e.step, e.value) for e in events.Scalars("eval/vqa/count")] == [(0, count)]
    assert len(text_at(events, "eval/samples/vqa")[0].splitlines()) == 4


# --------------------------------------------------------------------------- rank 0 only


def test_only_the_main_process_builds_loggers(load_sft, tmp_path, monkeypatch):
    from lavis.runners import build_runner

    runner = build_runner(load_sft("run.tensorboard.log_dir=tb", "run.wandb.project=lavis-test"))
    monkeypatch.setattr(SingleProcess, "is_main", property(lambda self: False))
    assert isinstance(runner.metrics_writer(None), NullMetricsWriter)
    assert not runner.output_dir.exists()
    monkeypatch.setattr(SingleProcess, "is_main", property(lambda self: True))
    writer = runner.metrics_writer(None)  # W&B is disabled in the suite: wandb.init gives a run that drops everything
    try:
        assert isinstance(writer, MetricsWriter)
        assert sorted(type(logger).registry_name for logger in writer.loggers) == ["tensorboard", "wandb"]
        assert (runner.output_dir / "tb").is_dir()
    finally:
        writer.close()


# --------------------------------------------------------------------------- config


def test_loggers_are_registered_with_their_default_yaml_and_off_by_default(load_sft):
    settings = {"wandb": WandbConfig, "tensorboard": TensorBoardConfig}
    assert registry.list("logger") == sorted(settings)
    hints = typing.get_type_hints(RunConfig)
    for name, settings_class in settings.items():
        assert hints[name] is settings_class  # the block run.<name>
        text = (CONFIG_ROOT / "loggers" / f"{name}.yaml").read_text()
        assert list(yaml.safe_load(text)) == list(settings_class.__dataclass_fields__)
        for key in settings_class.__dataclass_fields__:  # every key is commented
            assert re.search(rf"^{key}:.*#", text, re.MULTILINE), key
    cfg = load_sft()
    assert not cfg.run.wandb.enabled and not cfg.run.tensorboard.enabled
    assert cfg.raw["run"]["tensorboard"] == {"log_dir": None}
    assert cfg.raw["run"]["wandb"] == {"project": None, "entity": None, "name": None, "tags": []}
    assert load_sft("run.tensorboard.log_dir=/abs/tb").run.tensorboard.log_dir == "/abs/tb"


def test_tensorboard_logger_alone_writes_what_it_is_given(load_sft, tmp_path):
    """The interface without a run: numbers as scalars, the table as Markdown, text-only samples without images."""
    cfg = load_sft()
    logger = TensorBoardLogger(TensorBoardConfig(log_dir=str(tmp_path / "tb")), cfg, tmp_path / "unused")
    logger.log_metrics({"loss": 2.0, "lr": 1e-3}, step=5)
    rows = [{"benchmark": "VQA", "split": "val", "metric": "accuracy", "value": 0.5, "samples": 4, "skipped": 1}]
    sample = {"id": "a|b", "prompt": "two\nlines", "output": "x", "prediction": "x", "reference": "{}", "image": None}
    logger.log_evaluation(rows, {"text": [sample]}, step=5)
    logger.finish()
    events = tensorboard_events(tmp_path / "tb")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 2.0)]
    assert text_at(events, "eval/results")[5].splitlines()[-1] == "| VQA | val | accuracy | 0.5000 | 4 | 1 |"
    assert text_at(events, "eval/samples/text")[5].splitlines()[-1] == "| a\\|b | two lines | x | x | {} | None |"
    assert events.Tags()["images"] == []
    assert not (tmp_path / "unused").exists()  # an absolute log_dir is not under the output_dir


def test_a_resumed_runs_tensorboard_events_replace_those_after_its_checkpoint(load_sft, tmp_path):
    """As in metrics.jsonl: a run resumed from step 2 rewrites step 3 (its interrupted predecessor's is dropped)
    and steps 1-2 appear once."""
    cfg, settings = load_sft(), TensorBoardConfig(log_dir="tb")
    for resume_step, losses in ((None, {1: 3.0, 2: 2.0, 3: 1.0}), (2, {3: 1.5, 4: 1.25})):
        # Through MetricsWriter, as the runner does: a resumed writer replays metrics.jsonl up to its step.
        writer = MetricsWriter(tmp_path / "metrics.jsonl", resume_step, loggers=[TensorBoardLogger(settings, cfg, tmp_path, resume_step)])
        for step, loss in losses.items():
            writer.write({"step": step, "loss": loss})
        writer.close()
    events = tensorboard_events(tmp_path / "tb")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.25)]
