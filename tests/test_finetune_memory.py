"""benchmarks/finetune_memory.py: the dry run tabulates every CPU mode, LoRA far below full fine-tuning;
``--full-size`` refuses to run without CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "finetune_memory.py"
CPU_MODES = ("full", "full-frozen-vit", "lora")
SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def quantity(cell: str) -> float:
    """The leading quantity of a table cell: ``"557k (25.3%)"`` -> 557e3, ``"10.0 MiB"`` -> 10 * 2**20."""
    match = re.match(r"([\d.]+)\s*(GiB|MiB|KiB|[kMG]?)", cell)
    assert match, f"not a quantity: {cell!r}"
    return float(match.group(1)) * SCALE[match.group(2)]


def run_benchmark(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_dry_run_tabulates_every_cpu_mode(tmp_path):
    proc = run_benchmark(tmp_path, "--quick")  # the dry run, one timed step
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    columns = re.split(r"\s{2,}", lines[header])
    assert columns == ["mode", "trainable", "optim state", "peak RSS", "s/step (min-max)"], columns
    rows = {}
    for line in lines[header + 1:]:
        cells = re.split(r"\s{2,}", line)
        if len(cells) == len(columns):
            rows[cells[0]] = dict(zip(columns, cells))
    assert set(CPU_MODES) <= set(rows), proc.stdout
    for row in rows.values():
        assert quantity(row["peak RSS"]) > 100 * 2**20 and quantity(row["s/step (min-max)"]) > 0, row
    full, frozen_vit, lora = (rows[m] for m in CPU_MODES)
    assert quantity(frozen_vit["trainable"]) < quantity(full["trainable"])
    assert quantity(lora["trainable"]) < 0.1 * quantity(full["trainable"]), (lora, full)
    assert quantity(lora["optim state"]) < 0.1 * quantity(full["optim state"]), (lora, full)
    assert re.search(r"LoRA optimiser state / full optimiser state: [\d.]+% \(goal <= 5%", proc.stdout), proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_full_size_refuses_without_cuda(tmp_path):
    proc = run_benchmark(tmp_path, "--full-size")
    assert proc.returncode != 0
    assert "--full-size needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
