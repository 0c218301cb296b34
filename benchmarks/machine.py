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
