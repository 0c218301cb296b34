"""benchmarks/gpu_throughput.py --dry-run: the GPU benchmark's code path runs on the CPU and prints its table."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(\S.*?)\s{2,}(\S.*)$")


def number(value: str) -> float:
    """The leading number of a table value (``"115.1 ms"`` -> 115.1)."""
    match = re.match(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|nan|inf", value)
    assert match, f"not a number: {value!r}"
    return float(match.group(0))


def test_dry_run_prints_positive_throughput(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--quick"],  # the dry run, one timed step
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    table = {m.group(1): m.group(2) for line in proc.stdout.splitlines() if (m := ROW.match(line))}
    for key in ("tokens/s (global)", "tokens/s per rank", "step time (mean)", "model TFLOP per step"):
        assert key in table, f"no '{key}' row in:\n{proc.stdout}"
        value = number(table[key])
        assert math.isfinite(value) and value > 0, f"{key}: {table[key]}"
    assert table["step time (mean)"].endswith(" ms")
    assert table["MFU"].startswith("n/a"), table["MFU"]  # no peak for a CPU unless --peak-tflops
    assert table["peak memory rank 0"] == "n/a (CPU)"
    assert "total" in proc.stdout and "llm" in proc.stdout  # the parameter report
