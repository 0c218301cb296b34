"""Packing vs padding: useful (non-pad) tokens per second of training on the SFT + multi-task mix.

    python benchmarks/packing.py [--samples 512] [--batch-size 8] [--max-len 512] [--rounds 4]
                                 [--epochs 1] [--sft-ratio 1.0] [--group-mult 8] [--options key=value ...]
    python benchmarks/packing.py --quick     # tiny sizes on a small world, seconds: the code path only

One tiny model (projects/multitask.yaml, everything trainable) and one fixed list of processed
samples drawn once from the seeded mixture of the multi-task sources plus the SFT conversations of
projects/sft.yaml (``--sft-ratio`` against the multi-task ratios, which sum to 1). Samples are
processed untruncated; those longer than ``max_len`` are dropped from the list for all three ways
(packing drops them too; the count is printed). The same samples are then batched three ways:

  (a) pad-to-max_len: ``batch_size`` samples per batch, every row padded to ``max_len``
      (Qwen-VL's finetune.py: ``padding="max_length"``);
  (b) pad-to-longest, length-grouped: shuffle, cut into pools of ``group_mult x batch_size`` samples,
      sort each pool by length, cut into batches of ``batch_size``, shuffle the batches; each batch is
      padded to its longest sample (LLaVA's ``group_by_length``: its megabatch is world size x batch
      size, so the default ``--group-mult 8`` is an 8-GPU LLaVA run; 1 is a single-GPU one);
  (c) packed: the stream's greedy packing (fill a row until the next sample does not fit) into
      ``batch_size`` rows of at most ``max_len`` tokens, samples isolated by ``PackCollator``.

Comparable steps: all three share the same worst-case batch, ``batch_size`` rows x ``max_len`` tokens,
i.e. the same memory budget one would size the batch to. (a) and (b) hold ``batch_size`` samples per
step (the same batch size, as a padded run must use the size whose longest batch fits); (c) holds
``batch_size`` rows of several samples, so it needs fewer steps for the same samples. Every way trains
on exactly the same samples (one pass per ``--epochs``), so the same number of useful tokens, and the
fair measure is useful tokens per second of wall time: tokens / total time of its steps. Each step is
``IterRunner.train_step`` (forward, backward, clipping, AdamW): the optimiser's cost per step is
included, which is part of what packing saves. The three ways run interleaved in ``--rounds`` slices of
their batch lists so that machine noise hits all alike, after a warm-up of a few steps each.

Prints tokens/s and padding fraction of each way and the ratios packing / pad-to-max_len
(target >= 3x) and packing / pad-to-longest grouped (target >= 1.3x).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.common.config import load_config  # noqa: E402
from lavis.datasets.collate import PackCollator, PadCollator  # noqa: E402
from lavis.datasets.stream import BatchStream, StreamConfig, with_skips  # noqa: E402
from lavis.processors.conversation import IGNORE_INDEX  # noqa: E402
from lavis.runners import build_runner  # noqa: E402

from machine import quick_workdir, warn_if_busy  # noqa: E402  (benchmarks/machine.py)

SFT_DATASET = [
    "datasets.synthetic_sft.builder=qwen_vl_conversation",
    "datasets.synthetic_sft.ann_path=data/synthetic/sft_train.json",
    "datasets.synthetic_sft.image_root=data/synthetic",
    "datasets.synthetic_sft.synthetic_root=data/synthetic",
]


def draw_samples(runner, n: int, seed: int) -> tuple[list[dict[str, Any]], Counter]:
    """``n`` processed samples (untruncated) from the runner's seeded mixture, and the skips met."""
    processor = runner.task.sample_processor(runner.model, runner.processors)
    processor.truncate = False
    stream = BatchStream(
        runner.sources,
        processor,
        lambda samples: {"samples": samples},  # no collation: we only want the samples
        StreamConfig(batch_size=1, max_len=10**9, pack=False, seed=seed),
    )
    samples: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for batch in stream:
        samples += batch["samples"]
        skipped += batch["skipped"]
        if len(samples) >= n:
            return samples[:n], skipped
    raise AssertionError("unreachable")


def pad_to(batch: dict[str, Any], length: int, pad_id: int) -> dict[str, Any]:
    """Right-pad a PadCollator batch further, to ``length`` columns."""
    extra = length - batch["input_ids"].shape[1]
    if extra > 0:
        pad = torch.nn.functional.pad
        batch["input_ids"] = pad(batch["input_ids"], (0, extra), value=pad_id)
        batch["labels"] = pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        batch["attention_mask"] = pad(batch["attention_mask"], (0, extra), value=0)
    return batch


def pack_rows(samples: list[dict[str, Any]], max_len: int, rows_per_batch: int) -> list[list[list[dict[str, Any]]]]:
    """The stream's greedy packing (``_Walker.packed_batch``) over a fixed list: batches of rows."""
    rows: list[list[dict[str, Any]]] = [[]]
    length = 0
    for sample in samples:
        n = len(sample["input_ids"])
        if length + n <= max_len:
            rows[-1].append(sample)
            length += n
        else:
            rows.append([sample])
            length = n
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def length_grouped(samples: list[dict[str, Any]], batch_size: int, mult: int, rng: random.Random) -> list[list[dict[str, Any]]]:
    """LLaVA-style length grouping: pools of ``mult x batch_size`` sorted by length, batches shuffled."""
    order = samples[:]
    rng.shuffle(order)
    pool = mult * batch_size
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda s: len(s["input_ids"]), reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def finish(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch as the stream hands it to the runner (no skips met: the samples are drawn)."""
    return with_skips(batch, [])


QUICK = {"samples": 16, "batch_size": 2, "max_len": 256, "rounds": 1, "epochs": 1, "warmup": 1, "group_mult": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="fixed samples drawn once from the mixture")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (samples per step when padded)")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved slices of each way's batches")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the samples per way")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per way first")
    parser.add_argument("--sft-ratio", type=float, default=1.0, help="SFT conversations' ratio (multi-task ratios sum to 1)")
    parser.add_argument("--group-mult", type=int, default=8, help="(b): length-grouping pool = this x batch size (LLaVA: world size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--quick", action="store_true",
                        help=f"seconds, on a small world: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (numbers mean nothing)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
        os.chdir(quick_workdir("packing"))  # a small world at data/synthetic, the projects' relative paths
    else:
        os.chdir(REPO)  # the projects' data paths are relative to the repository root
        warn_if_busy()
    work = Path(tempfile.mkdtemp(prefix="packing_"))
    cfg = load_config(
        REPO / "projects" / "multitask.yaml",
        [
            f"run.output_dir={work}",
            "run.num_workers=0",
            f"run.max_len={args.max_len}",
            f"run.batch_size={args.batch_size}",
            f"run.max_steps={10**6}",  # a flat lr over the benchmark: no schedule end
            *SFT_DATASET,
            f"datasets.synthetic_sft.ratio={args.sft_ratio}",
            *args.options,
        ],
    )
    runner = build_runner(cfg)
    pad_id = runner.processors.tokenizer.pad_id
    drawn, skipped = draw_samples(runner, args.samples, cfg.run.seed + args.seed)
    lengths = [len(s["input_ids"]) for s in drawn]
    samples = [s for s in drawn if len(s["input_ids"]) <= args.max_len]
    dropped = len(drawn) - len(samples)

    pad_collate = PadCollator(pad_id)
    pack_collate = runner.task.collator(runner.processors, runner.model.llm.config._attn_implementation)
    assert isinstance(pack_collate, PackCollator), "projects/multitask.yaml is expected to pack"
    rng = random.Random(args.seed)
    ways = {
        "pad to max_len": [
            finish(pad_to(pad_collate(samples[i : i + args.batch_size]), args.max_len, pad_id))
            for i in range(0, len(samples), args.batch_size)
        ],
        "pad to longest, grouped": [finish(pad_collate(b)) for b in length_grouped(samples, args.batch_size, args.group_mult, rng)],
        "packed": [finish(pack_collate(rows)) for rows in pack_rows(samples, args.max_len, args.batch_size)],
    }

    def step(batch: dict[str, Any]) -> None:
        runner.set_lr(runner.step)
        runner.train_step([batch])
        runner.step += 1

    runner.model.train()
    for batches in ways.values():  # warm-up: allocator, optimiser state, kernels for each shape
        for batch in batches[: args.warmup]:
            step(batch)

    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.epochs):
        for r in range(args.rounds):
            for name, batches in ways.items():
                lo, hi = r * len(batches) // args.rounds, (r + 1) * len(batches) // args.rounds
                for batch in batches[lo:hi]:
                    start = time.perf_counter()
                    step(batch)
                    times[name].append(time.perf_counter() - start)

    print(
        f"{len(drawn)} samples drawn (skipped while drawing: {dict(skipped) or 0}); length min/median/mean/max "
        f"{min(lengths)}/{int(statistics.median(lengths))}/{statistics.mean(lengths):.0f}/{max(lengths)}; "
        f"{dropped} longer than max_len {args.max_len} dropped, {len(samples)} used"
    )
    print(
        f"batch: {args.batch_size} rows x <= {args.max_len} tokens; torch threads {torch.get_num_threads()}; "
        f"{args.epochs} pass(es), {args.rounds} interleaved rounds, attention isolation {pack_collate.isolation}"
    )
    print(f"{'way':<25} {'steps':>5} {'samples/step':>12} {'pad frac':>8} {'ms/step':>8} {'tokens/s':>9}")
    rate = {}
    for name, batches in ways.items():
        useful = sum(b["num_input_tokens"] for b in batches) * args.epochs
        total = sum(b["input_ids"].numel() for b in batches)
        nsamples = sum(b["num_samples"] for b in batches)
        rate[name] = useful / sum(times[name])
        print(
            f"{name:<25} {len(batches):>5} {nsamples / len(batches):>12.1f} {1 - useful / args.epochs / total:>8.1%} "
            f"{statistics.median(times[name]) * 1e3:>8.1f} {rate[name]:>9.0f}"
        )
    print(f"ratio packed / pad to max_len          : {rate['packed'] / rate['pad to max_len']:.2f}x   (target >= 3x)")
    print(f"ratio packed / pad to longest, grouped : {rate['packed'] / rate['pad to longest, grouped']:.2f}x   (target >= 1.3x)")


if __name__ == "__main__":
    main()
