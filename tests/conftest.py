"""Shared fixtures: offline environment, a small synthetic world, the SFT project with overrides."""

from __future__ import annotations

import os

# Before torch / transformers are imported by any test module: offline, no wandb, and one
# intra-op thread (the test machines have 2 cores shared by several processes; oversubscribed
# OpenMP threads make each step 10-50x slower). Subprocesses started by tests inherit these.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SFT_PROJECT = REPO / "projects" / "sft.yaml"
KILLED_DURING_SAVE = REPO / "tests" / "train_killed_during_save.py"  # train.py that dies mid-save
# Data of the real Qwen-VL-Chat release (its qwen.tiktoken vocabulary): $LAVIS_REFERENCE, else the
# project's shared/reference beside the checkout, else the workplace's (a CI clone elsewhere finds it).
REFERENCE = next(
    (p for p in (Path(os.environ.get("LAVIS_REFERENCE", REPO.parent / "shared" / "reference")),
                 REPO.parent / "shared" / "reference", Path("/work/shared/reference")) if p.is_dir()),
    REPO.parent / "shared" / "reference",
)
TINY_PRESET = REPO / "configs" / "models" / "presets" / "tiny.yaml"
SMALL_WORLD_SIZES = {"train": 64, "val": 8, "test": 8}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "distributed: starts several processes with torchrun (run alone: pytest -m distributed)")
    config.addinivalue_line(
        "markers",
        "integration: end to end (train.py/evaluate.py subprocesses, a browser, long trainings); "
        "`make test-fast` leaves them out, `make test` runs them",
    )
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; `make gpu-check` runs them)")


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A synthetic world with 64 train scenes (about 0.1 s to generate), shared by the session."""
    from lavis.datasets.synthetic.world import ensure_world

    return ensure_world(tmp_path_factory.mktemp("world") / "synthetic", sizes=SMALL_WORLD_SIZES)


def sft_options(world: Path, output_dir: Path, *extra: str) -> list[str]:
    """``--options`` that point projects/sft.yaml at ``world`` and make it small, quick and CPU-only.

    Every component trains and checkpoints hold the trainable weights only (the project freezes the
    ViT and saves full weights), so that the mechanisms under test see all three components. No
    warm-up unless ``extra`` sets one.
    """
    return [
        "model.freeze.vision=trainable",
        "run.save_weights=trainable",
        f"datasets.synthetic_sft.ann_path={world / 'sft_train.json'}",
        f"datasets.synthetic_sft.image_root={world}",
        f"datasets.synthetic_sft.synthetic_root={world}",  # an existing world is used whatever its size
        "run.device=cpu",
        "run.num_workers=0",
        "run.batch_size=4",
        "run.max_len=256",
        "run.log_every=1",
        "run.warmup_steps=0",  # runs of a few steps (a warm-up must end before run.max_steps)
        f"run.output_dir={output_dir}",
        *extra,
    ]


@pytest.fixture
def load_sft(small_world, tmp_path):
    """``load_sft(*options, output_dir=None)`` -> the validated Config of projects/sft.yaml on the small world."""
    from lavis.common.config import load_config

    def load(*extra: str, output_dir: Path | None = None):
        return load_config(SFT_PROJECT, sft_options(small_world, output_dir or tmp_path / "out", *extra))

    return load


def train_command(options: list[str], cfg_path: Path = SFT_PROJECT) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--cfg-path", str(cfg_path), "--options", *options]


def run_train(options: list[str], timeout: float = 120, cfg_path: Path = SFT_PROJECT) -> subprocess.CompletedProcess:
    """``python train.py --cfg-path <cfg_path> --options ...`` in a subprocess (output captured as text)."""
    return subprocess.run(
        train_command(options, cfg_path), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def chat_run(small_world, tmp_path_factory) -> Path:
    """A run directory holding a chat model after 2 SFT steps: what ``lavis.load_model``, the web demo's
    and the API's ``--ckpt`` take."""
    out = tmp_path_factory.mktemp("chat_run") / "sft"
    result = run_train(sft_options(small_world, out, "run.max_steps=2", "run.save_every=2", "run.save_weights=full"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def popen_train(options: list[str], log_path: Path, cfg_path: Path = SFT_PROJECT) -> subprocess.Popen:
    """Start train.py in the background; stdout and stderr go to ``log_path``."""
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(train_command(options, cfg_path), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def eval_options(world: Path, *names: str, max_samples: int | None = None) -> list[str]:
    """``--options`` adding evaluations of the small world's val split (vqa, grounding, caption)."""
    w = str(world)
    entries = {
        "vqa": ["task=vqa", "builder=vqa", f"ann_path={w}/vqa_val.jsonl"],
        "grounding": ["task=grounding", "builder=ref_grounding", f"ann_path={w}/refs_val.json"],
        "caption": ["task=captioning", "builder=coco_caption", f"ann_path={w}/captions_val.json"],
    }
    options = []
    for name in names:
        extra = [f"image_root={w}"] + ([f"max_samples={max_samples}"] if max_samples else [])
        options += [f"evaluation.{name}.{kv}" for kv in entries[name] + extra]
    return options
