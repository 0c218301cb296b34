"""What the benchmarks share: a check that nothing else is using the cores being measured."""

from __future__ import annotations

import os
import time
from pathlib import Path


def other_cpu_use(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over ``seconds`` while this one sleeps (Linux; else 0)."""

    def busy_idle() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle, idle

    try:
        (b0, i0), _, (b1, i1) = busy_idle(), time.sleep(seconds), busy_idle()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (b1 - b0) / max((b1 - b0) + (i1 - i0), 1)


def warn_if_busy(threshold: float = 0.2) -> None:
    """Print a warning when other processes use the cores: torch's threads then wait on each other
    and step times swing widely."""
    busy = other_cpu_use()
    if busy > threshold:
        print(f"warning: other processes use {busy:.1f} of the {os.cpu_count()} cores; timings will be noisy")


# --------------------------------------------------------------------------------- quick mode
#
# Every benchmark takes ``--quick``: tiny sizes and a few iterations on the same code path, done in
# seconds, so that tests/test_benchmarks_quick.py runs each one and none rots unnoticed. Its numbers
# mean nothing. The projects' data paths are relative (``data/synthetic/...``): a quick run works in a
# temporary directory holding a small synthetic world there.

QUICK_WORLD_SIZES = {"train": 24, "val": 4, "test": 8}


def quick_workdir(prefix: str) -> Path:
    """A new temporary directory with a small synthetic world at ``data/synthetic``, to ``chdir`` into."""
    import tempfile

    from lavis.datasets.synthetic.world import ensure_world

    work = Path(tempfile.mkdtemp(prefix=f"{prefix}_quick_"))
    ensure_world(work / "data" / "synthetic", sizes=QUICK_WORLD_SIZES)
    return work


def quick_model(work: Path) -> Path:
    """A run directory (``work/outputs/sft``) of one SFT step of the tiny model on ``work``'s world, run by
    the runner as train.py runs it: what ``--model`` / ``--ckpt`` take in place of ``make demo``'s."""
    from lavis.common.config import load_config
    from lavis.runners import build_runner

    out = work / "outputs" / "sft"
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "projects" / "sft.yaml",
        [f"run.output_dir={out}", "run.device=cpu", "run.num_workers=0", "run.max_steps=1", "run.warmup_steps=0",
         "run.batch_size=2", "run.save_weights=full", "run.log_every=1"],
    )
    build_runner(cfg).train()
    return out
