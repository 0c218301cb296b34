"""Does the data loader keep up with video? Decoded frames per second per worker against what a step consumes,
and the share of step time the real training loop waits for data (goal < 5%), on the video project.

    python benchmarks/video_loader.py [--project projects/video/train.yaml] [--loader-batches 20]
                                      [--steps 30] [--warmup 5] [--options key=value ...]
    python benchmarks/video_loader.py --quick    # a small video world, batch 4, a few steps: seconds

With the project's own model, batch size and ``run.num_workers``:

  1. one worker: ``IterRunner.data_iterator()`` with ``run.num_workers=1`` (one DataLoader worker process
     running the project's dataset, SampleProcessor and collator: decode, sample, resize, patchify,
     tokenise), timed over ``--loader-batches`` batches after the first (worker start-up reported apart;
     the worker never waits, its queue being drained as it fills): video frames the model sees per second;
  2. one step: ``train_step`` alone on batches fetched beforehand (the loader shut down first) over
     ``--steps`` steps after ``--warmup``: frames a step consumes (frames per sample x samples per step) over
     its time is the rate the loader must sustain; over 1's rate per worker, the workers that keeps up;
  3. the real loop: ``IterRunner.train()`` for ``--warmup + --steps`` steps, one ``metrics.jsonl`` record per
     step: the runner's ``data_wait_share`` (time blocked in ``next(batches)`` over the step's wall time),
     over the steps after the warm-up, weighted by their durations; the first step (workers starting) apart.

Frames counted are those the model sees (a video's temporal patches x ``temporal_patch_size``), what the
worker decodes when the project's ``fps`` keeps every frame of its clips (projects/video: 8 frames at 4 fps).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataloader import train_rate  # noqa: E402  (benchmarks/dataloader.py)

from lavis.common.config import load_config  # noqa: E402
from lavis.processors.native_image import PatchImages  # noqa: E402
from lavis.runners import build_runner  # noqa: E402
from lavis.tracking.logging import read_metrics  # noqa: E402

from machine import warn_if_busy  # noqa: E402  (benchmarks/machine.py)

PROJECT = REPO / "projects" / "video" / "train.yaml"
QUICK_VIDEO_SIZES = {"train": 12, "val": 4, "test": 4}


def video_frames(batch: dict[str, Any], temporal_patch: int) -> int:
    """The video frames the model sees in a batch: temporal patches x ``temporal_patch`` of each video."""
    pixels = batch.get("pixel_values")
    if not isinstance(pixels, PatchImages) or pixels.second_per_grid is None:
        return 0
    videos = pixels.second_per_grid > 0  # images have 0
    return int(pixels.grid_thw[videos, 0].sum()) * temporal_patch


def build(project: Path, out: Path, max_steps: int, options: list[str]):
    cfg = load_config(project, [f"run.output_dir={out}", f"run.max_steps={max_steps}", f"run.save_every={10**6}", *options])
    return build_runner(cfg)


def worker_rate(runner, batches: int, temporal_patch: int) -> tuple[float, float, float]:
    """One worker process: (start-up seconds to the first batch, frames/s, samples/s) over ``batches`` batches."""
    start = time.perf_counter()
    it = runner.data_iterator()
    next(it)
    first = time.perf_counter()
    frames = samples = 0
    for _ in range(batches):
        batch = next(it)
        frames += video_frames(batch, temporal_patch)
        samples += batch["num_samples"]
    elapsed = time.perf_counter() - first
    it.close()
    return first - start, frames / elapsed, samples / elapsed


def frames_per_step(runner, steps: int, temporal_patch: int) -> tuple[float, float]:
    """(frames per step, samples per step) over a fresh runner's first ``steps`` steps (the loop's batches)."""
    it = runner.data_iterator()
    batches = [next(it) for _ in range(steps * runner.run.grad_accum)]
    it.close()
    return (sum(video_frames(b, temporal_patch) for b in batches) / steps, sum(b["num_samples"] for b in batches) / steps)


def loop_wait(runner, warmup: int) -> tuple[float, float, float]:
    """Run ``train()`` (one record per step): (the first step's wait share, the wait share of the steps after
    ``warmup``, their mean seconds per step), from the runner's own ``data_wait_share``."""
    runner.train()
    records = [r for r in read_metrics(runner.output_dir / "metrics.jsonl") if "loss" in r]
    # a step's duration: between its record and the one before (the window's own timer starts there too)
    durations = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
    window = list(zip(records[1:], durations))[max(warmup - 1, 0):]
    total = sum(d for _, d in window)
    share = sum(r["data_wait_share"] * d for r, d in window) / total
    return records[0]["data_wait_share"], share, total / len(window)


def quick_workdir() -> Path:
    """A temporary directory with a small synthetic video world at ``data/videos`` (the project's paths)."""
    from lavis.datasets.synthetic.videos import ensure_videos

    work = Path(tempfile.mkdtemp(prefix="video_loader_quick_"))
    ensure_videos(work / "data" / "videos", sizes=QUICK_VIDEO_SIZES)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=PROJECT, help="a project training on videos")
    parser.add_argument("--loader-batches", type=int, default=20, help="batches timed from one worker")
    parser.add_argument("--steps", type=int, default=30, help="steps timed after the warm-up (train_step and the loop)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--quick", action="store_true", help="a 12-clip world, batch 4, 2 loader batches, 2 steps after 1 "
                        "(numbers mean nothing)")
    args = parser.parse_args()
    project = args.project.resolve()
    if args.quick:
        args.loader_batches, args.steps, args.warmup = 2, 2, 1
        args.options = ["run.batch_size=4", "run.warmup_steps=0", "run.num_workers=1", *args.options]
        os.chdir(quick_workdir())  # the project's relative data paths resolve there
    else:
        os.chdir(REPO)
        warn_if_busy()
    work = Path(tempfile.mkdtemp(prefix="video_loader_"))
    max_steps = args.warmup + args.steps

    runner = build(project, work / "worker", max_steps, [*args.options, "run.num_workers=1"])
    temporal_patch = runner.processors.video.temporal_patch_size
    startup, frames_per_s, samples_per_s = worker_rate(runner, args.loader_batches, temporal_patch)
    del runner
    gc.collect()

    runner = build(project, work / "count", max_steps, args.options)
    run, device = runner.run, runner.device
    step_frames, step_samples = frames_per_step(runner, max_steps, temporal_patch)
    del runner
    gc.collect()
    _, step_ms = train_rate(build(project, work / "train", max_steps, args.options), args.steps, args.warmup)
    gc.collect()
    first_share, share, loop_s = loop_wait(build(project, work / "loop", max_steps, [*args.options, "run.log_every=1"]),
                                           args.warmup)

    consumed = step_frames / (step_ms / 1e3)  # frames/s the steps take in
    needed = math.ceil(consumed / frames_per_s) if frames_per_s else float("inf")
    print(f"{args.project}: batch_size {run.batch_size} x grad_accum {run.grad_accum}, max_len {run.max_len}, "
          f"num_workers {run.num_workers}; device {device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    print(f"  one worker         : {frames_per_s:8.1f} frames/s  ({samples_per_s:.1f} samples/s; first batch after "
          f"{startup:.2f} s, then {args.loader_batches} batches timed)")
    print(f"  a step consumes    : {step_frames:8.1f} frames    ({step_frames / max(step_samples, 1e-9):.1f} frames/sample "
          f"x {step_samples:.1f} samples)")
    print(f"  train_step alone   : {step_ms:8.0f} ms/step  ({args.steps} steps after {args.warmup}, batches pre-fetched)")
    print(f"  steps consume      : {consumed:8.1f} frames/s")
    print(f"  worker / step rate = {frames_per_s / consumed:.2f}x per worker: {needed} worker(s) keep up "
          f"(the project has {run.num_workers})")
    print(f"  real training loop : {loop_s * 1e3:8.0f} ms/step  ({args.steps} steps after {args.warmup})")
    print(f"  waiting for data   : {share:8.1%} of step time  (target < 5%; the first step, workers starting: {first_share:.0%})")


if __name__ == "__main__":
    main()
