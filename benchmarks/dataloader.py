"""Data loading vs training: does the loader keep up, and how long does training wait for data?

    python benchmarks/dataloader.py [--project sft|multitask|both] [--loader-batches 40]
                                    [--steps 40] [--warmup 5] [--options key=value ...]
    python benchmarks/dataloader.py --quick     # both projects, a few batches, one worker, small world: seconds

For each project (projects/sft.yaml: padded conversations; projects/multitask.yaml: the packed
multi-task mixture), with the project's own ``run.num_workers`` and batch size:

  1. loader samples/s: ``IterRunner.data_iterator()`` alone, no training, over ``--loader-batches``
     batches counted from the first one (worker start-up is reported apart);
  2. training samples/s: ``train_step`` on batches fetched beforehand (the loader's workers are shut
     down first), so nothing but the step runs; a fresh runner's stream repeats itself, so these are
     the very batches of 3's timed window, after the same warm-up;
  3. the real loop: ``IterRunner.train()`` itself with its ``data_iterator`` wrapped to time every
     ``next(batches)``; after ``--warmup`` steps, the share of wall time over ``--steps`` steps spent
     blocked waiting for a batch (target < 5%), and the samples/s that loop achieves.

The DataLoader workers are processes of their own: in 1 they have the cores to themselves, in 3 they
compete with the training threads (torch threads and num_workers are printed). The prefetch queue
(``prefetch_factor`` x workers batches) fills during the warm-up, so a loader slower than training
shows up in 3 only once the queue is drained: compare 1 and 2 for the steady state. The last line
compares 3's step time without its waits with 2's: the cost of sharing the cores with the workers.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.common.config import load_config  # noqa: E402
from lavis.runners import build_runner  # noqa: E402

from machine import quick_workdir, warn_if_busy  # noqa: E402  (benchmarks/machine.py)

PROJECTS = {"sft": "projects/sft.yaml", "multitask": "projects/multitask.yaml"}


def build(project: str, work: Path, max_steps: int, options: list[str]):
    cfg = load_config(
        REPO / PROJECTS[project],
        [
            f"run.output_dir={work / project}",
            f"run.max_steps={max_steps}",
            f"run.save_every={10**6}",  # only the final checkpoint, written after the timed window
            *options,
        ],
    )
    return build_runner(cfg)


def loader_rate(runner, batches: int) -> tuple[float, float]:
    """(start-up seconds to the first batch, samples/s over the next ``batches`` batches)."""
    start = time.perf_counter()
    it = runner.data_iterator()
    next(it)
    first = time.perf_counter()
    samples = sum(next(it)["num_samples"] for _ in range(batches))
    rate = samples / (time.perf_counter() - first)
    it.close()  # drops the DataLoader iterator: its workers exit
    return first - start, rate


def train_rate(runner, steps: int, warmup: int) -> tuple[float, float]:
    """(samples/s, ms/step) of ``train_step`` alone over ``steps`` steps on batches fetched beforehand.

    A fresh runner's stream gives the same batches in the same order as the real loop's, so with
    ``steps`` equal to the loop's these are the very batches of the loop's timed window.
    """
    accum = runner.run.grad_accum
    it = runner.data_iterator()
    fetched = [next(it) for _ in range((warmup + steps) * accum)]
    it.close()  # its workers exit: nothing but the steps runs
    gc.collect()
    runner.model.train()
    micro_batches = [fetched[i : i + accum] for i in range(0, len(fetched), accum)]
    for micro in micro_batches[:warmup]:
        runner.set_lr(runner.step)
        runner.train_step(micro)
        runner.step += 1
    samples, start = 0, time.perf_counter()
    for micro in micro_batches[warmup:]:
        runner.set_lr(runner.step)
        samples += runner.train_step(micro).samples
        runner.step += 1
    elapsed = time.perf_counter() - start
    return samples / elapsed, elapsed / steps * 1e3


def real_loop(runner, warmup: int, steps: int) -> tuple[float, float, float, float]:
    """Run ``train()``; over the timed window: (share of time blocked in next(batches), samples/s,
    ms/step, ms/step not counting the waits).

    The window runs from the ``next()`` call that starts step ``warmup + 1`` to the one that starts step
    ``warmup + steps + 1`` (the last step, whose checkpoint save is then outside the window).
    """
    calls: list[tuple[float, float, int]] = []  # (called, returned, samples) per next()
    original = runner.data_iterator

    def timed() -> Iterator[dict[str, Any]]:
        it = original()
        while True:
            called = time.perf_counter()
            batch = next(it)
            calls.append((called, time.perf_counter(), batch["num_samples"]))
            yield batch

    runner.data_iterator = timed
    try:
        runner.train()
    finally:
        del runner.data_iterator
    accum = runner.run.grad_accum
    first, last = warmup * accum, (warmup + steps) * accum  # indices of the window's bounding next() calls
    window = calls[first:last]
    total = calls[last][0] - calls[first][0]
    waiting = sum(returned - called for called, returned, _ in window)
    samples = sum(n for *_, n in window)
    return waiting / total, samples / total, total / steps * 1e3, (total - waiting) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", choices=[*PROJECTS, "both"], default="both")
    parser.add_argument("--loader-batches", type=int, default=40, help="batches timed from the loader alone")
    parser.add_argument("--steps", type=int, default=40, help="steps of the real loop timed after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (loop and pre-fetched)")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--quick", action="store_true", help="2 loader batches, 2 steps after 1, batch 2, max_len 256, "
                        "1 worker, on a small world: seconds (numbers mean nothing)")
    args = parser.parse_args()

    if args.quick:
        args.loader_batches, args.steps, args.warmup = 2, 2, 1
        args.options = ["run.batch_size=2", "run.max_len=256", "run.num_workers=1", "run.warmup_steps=0", *args.options]
        os.chdir(quick_workdir("dataloader"))  # a small world at data/synthetic, the projects' relative paths
    else:
        os.chdir(REPO)  # the projects' data paths are relative to the repository root
        warn_if_busy()
    work = Path(tempfile.mkdtemp(prefix="dataloader_"))
    for project in PROJECTS if args.project == "both" else [args.project]:
        # A fresh runner per measurement: each starts from the same weights and the same data position.
        def fresh(name: str, project: str = project):
            return build(project, work / name, args.warmup + args.steps + 1, args.options)

        runner = fresh("loader")
        run = runner.run
        startup, loader = loader_rate(runner, args.loader_batches)
        del runner
        gc.collect()
        training, train_ms = train_rate(fresh("train"), args.steps, args.warmup)
        gc.collect()
        share, loop, loop_ms, busy_ms = real_loop(fresh("loop"), args.warmup, args.steps)
        print(
            f"{project} ({PROJECTS[project]}): {'packed' if run.pack else 'padded'}, batch_size {run.batch_size}"
            f"{' rows' if run.pack else ''} x grad_accum {run.grad_accum}, max_len {run.max_len}; "
            f"num_workers {run.num_workers}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores"
        )
        print(
            f"  loader alone       : {loader:8.1f} samples/s  "
            f"(first batch after {startup:.2f} s, then {args.loader_batches} batches timed)"
        )
        print(f"  train_step alone   : {training:8.1f} samples/s  ({train_ms:.0f} ms/step; the loop's {args.steps} batches, pre-fetched)")
        print(f"  real training loop : {loop:8.1f} samples/s  ({loop_ms:.0f} ms/step over {args.steps} steps after {args.warmup})")
        print(f"  waiting for data   : {share:8.1%} of loop time   (target < 5%)")
        print(
            f"  loader / train_step = {loader / training:.1f}x; loop step minus waits {busy_ms:.0f} ms vs {train_ms:.0f} ms alone "
            f"({busy_ms / train_ms - 1:+.0%}: workers and loop bookkeeping on the same cores)"
        )

if __name__ == "__main__":
    main()
