"""The documented commands chained by a script (``make ablation``, ``make video-demo``, ``make dpo-demo``): train a
project, evaluate a run, each in its own process exactly as a user runs ``train.py`` / ``evaluate.py``, from the
repository root (the projects' data and output paths are relative to it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS_LINE = "predictions and metrics: "  # evaluate.py's last line names its results directory


def train_project(project: str | Path, options: Sequence[str] = (), threads: int | None = None) -> float:
    """Train ``project`` with ``options`` (an earlier run in its output_dir is moved aside: ``run.overwrite=true``);
    its wall time in seconds. ``threads``: the trainer's ``OMP_NUM_THREADS`` unless the environment sets it."""
    start = time.time()
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "train.py", "--cfg-path", str(project), "--options", "run.overwrite=true", *options]
    subprocess.run(cmd, check=True, env=env)
    return time.time() - start


def evaluate_run(project: str | Path, run: str | Path, options: Sequence[str] = (), show_log: bool = True) -> Path:
    """Evaluate the trained ``run`` with ``project`` and ``options`` (earlier results of the same checkpoint moved
    aside); its results directory (``<name>.json`` per evaluation, ``results.md``). The results table is printed;
    the log too unless ``show_log`` is false."""
    cmd = [sys.executable, "evaluate.py", "--cfg-path", str(project), "--options", f"model.load_from={run}",
           "run.overwrite=true", *options]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=None if show_log else subprocess.PIPE,
                         text=True).stdout
    print(out, end="")
    line = next(line for line in out.splitlines() if line.startswith(RESULTS_LINE))
    return Path(line[len(RESULTS_LINE):].split("/<name>.json")[0])
