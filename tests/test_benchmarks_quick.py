"""Every benchmark's ``--quick`` mode runs (tiny sizes, a few iterations, the same code path) and prints
its table: a benchmark that breaks (as benchmarks/packing.py did with ``KeyError: 'skip_records'``) fails
here, not on the day someone wants its numbers. The numbers themselves are not checked (timings live in
benchmarks/, never in timed tests); only that each ran to its last line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
HELPERS = {"machine.py"}  # shared code, not a benchmark

# Each benchmark (the script, then any arguments before --quick): lines (substrings) its quick run must print,
# and the marks of its test.
EXPECTED = {
    "packing.py": (["samples drawn", "pad to max_len", "pad to longest, grouped", "packed",
                    "ratio packed / pad to max_len", "ratio packed / pad to longest, grouped"], ()),
    "packing.py --native": (["mixed resolution: ", "pad to max_len", "pad to longest, grouped", "packed",
                             "mixed resolution ratio packed / pad to max_len", "mixed resolution ratio packed / pad to longest"], ()),
    "native_vit.py": (["qwen2_vl: outputs equal", "qwen2_5_vl: outputs equal", "ratio ours / transformers (qwen2_vl)",
                       "ratio ours / transformers (qwen2_5_vl)"], ()),
    "step_overhead.py": (["bare PyTorch step", "runner train_step", "ratio runner/bare"], ()),
    "dataloader.py": (["sft (projects/sft.yaml)", "multitask (projects/multitask.yaml)", "loader alone",
                       "train_step alone", "real training loop", "waiting for data"], ()),
    "eval_gap.py": (["caption/CIDEr", "vqa/accuracy", "grounding/accuracy", "untrained", "blind prior", "trained"], ()),
    "adapter_tokens.py": (["vision patches", "adapter tokens", "within/across"], ()),
    "serve.py": (["batching on (8)", "batching off (1)", "batching on / off"], ()),
    "balance.py": (["padded, batch_size", "padded, budget", "packed, budget", "padded: vision max/mean",
                    "packed: vision max/mean"], ()),
    "preference.py": (["(a) separate samples", "(b) one row per pair", "(c) packed", "ratio packed / separate"], ()),
    "video_loader.py": (["one worker", "a step consumes", "train_step alone", "worker(s) keep up", "real training loop",
                         "waiting for data"], ()),
    # four launches of 1-2 processes each (FSDP and DDP under torchrun): about a minute
    "distributed.py": (["(a) per-rank memory", "(b) step time", "median step", "wall time"], (pytest.mark.distributed,)),
}
# Benchmarks whose quick mode has a test of its own, which also checks the numbers it prints.
TESTED_ELSEWHERE = {"gpu_throughput.py": "tests/test_gpu_throughput.py", "finetune_memory.py": "tests/test_finetune_memory.py"}


def test_every_benchmark_has_a_quick_test():
    found = {p.name for p in BENCHMARKS.glob("*.py")} - HELPERS
    tested = {command.split()[0] for command in EXPECTED} | set(TESTED_ELSEWHERE)
    assert found == tested, f"benchmarks without a quick-mode test: {sorted(found - tested)}"
    for script, test in TESTED_ELSEWHERE.items():
        assert '"--quick"' in (REPO / test).read_text(), f"{test} does not run {script} --quick"


@pytest.mark.parametrize(
    "command",
    [pytest.param(name, marks=marks, id=name.replace(".py", "").replace(" --", "-")) for name, (_, marks) in EXPECTED.items()],
)
def test_quick_mode_runs(command, tmp_path):
    script, *arguments = command.split()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}  # the benchmarks' scratch directories (small worlds, runs) go here
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments, "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command} --quick exited {proc.returncode}:\n{output[-4000:]}"
    missing = [line for line in EXPECTED[command][0] if line not in proc.stdout]
    assert not missing, f"{command} --quick printed none of {missing}:\n{proc.stdout[-4000:]}"
