"""Runner overhead: our training step vs a bare PyTorch loop on the tiny model and one batch.

    python benchmarks/step_overhead.py [--steps 40] [--rounds 5] [--warmup 5] [--options key=value ...]
    python benchmarks/step_overhead.py --quick     # 2 steps each on a small world, seconds: the code path only

Both loops run the same model computation (the VLM's loss over supervised tokens) on the same
batch, in one process, interleaved in rounds so that machine noise hits both alike. The bare loop
is forward, backward, AdamW step, zero_grad; ours is ``IterRunner.train_step`` as configured
(token-normalised loss, gradient clipping, bookkeeping). Prints median step times and the ratio
(target: <= 1.10).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.common.config import load_config  # noqa: E402
from lavis.runners import build_runner  # noqa: E402

from machine import quick_workdir  # noqa: E402  (benchmarks/machine.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop first")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--quick", action="store_true", help="2 steps each, 1 round, 1 warm-up step, batch 2, on a "
                        "small world: seconds (numbers mean nothing)")
    args = parser.parse_args()
    quick = ["run.batch_size=2"] if args.quick else []
    if args.quick:
        args.steps, args.rounds, args.warmup = 2, 1, 1
    # The project's data paths are relative: to the repository root, or to a small world for --quick.
    os.chdir(quick_workdir("step_overhead") if args.quick else REPO)

    work = Path(tempfile.mkdtemp(prefix="step_overhead_"))
    world = Path("data/synthetic")
    cfg = load_config(
        REPO / "projects" / "sft.yaml",
        [f"run.output_dir={work}", "run.num_workers=0", f"datasets.synthetic_sft.synthetic_root={world}", *quick,
         *args.options],
    )
    runner = build_runner(cfg)
    batch = next(runner.data_iterator())
    model = runner.model

    bare_model = copy.deepcopy(model)
    bare_opt = torch.optim.AdamW(
        [p for p in bare_model.parameters() if p.requires_grad], lr=cfg.run.lr, betas=tuple(cfg.run.betas), eps=cfg.run.eps
    )
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}

    def bare_step() -> None:
        out = bare_model(**inputs)
        (out.loss_sum / out.num_tokens).backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def runner_step() -> None:
        runner.set_lr(runner.step)
        runner.train_step([batch])
        runner.step += 1

    model.train()
    bare_model.train()
    for _ in range(args.warmup):  # warm-up: allocator, optimiser state
        bare_step()
        runner_step()

    times: dict[str, list[float]] = {"bare": [], "runner": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare_step), ("runner", runner_step)):
            for _ in range(args.steps // args.rounds):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    bare, ours = statistics.median(times["bare"]), statistics.median(times["runner"])
    tokens = int(batch["attention_mask"].sum())
    print(f"batch: {len(batch['input_ids'])} samples, {tokens} tokens, {len(batch['pixel_values'])} images; "
          f"torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch step : {bare * 1e3:8.2f} ms (median of {len(times['bare'])})")
    print(f"runner train_step : {ours * 1e3:8.2f} ms (median of {len(times['runner'])})")
    print(f"ratio runner/bare : {ours / bare:.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
