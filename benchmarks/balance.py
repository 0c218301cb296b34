"""Balanced ranks: micro-batches by budget (``run.batch_tokens``, ``run.batch_patches``) against ``batch_size``.

    python benchmarks/balance.py [--samples 20000] [--steps 400] [--ranks 4] [--batch-size 8] [--max-len 2048]
                                 [--batch-tokens BATCH_SIZE*MAX_LEN] [--batch-patches 20480] [--packed-patches 32768]
                                 [--seed 0]
    python benchmarks/balance.py --quick     # fewer samples and steps, a second: the code path only

At native resolution every image has its own number of patches, so with a fixed batch size one rank's
micro-batch can hold several times the vision patches of another's, and every rank waits for the slowest
ViT at the step's gradient reduction. This benchmark measures that imbalance without a model: it runs the
real :class:`~lavis.datasets.stream.BatchStream` of ``--ranks`` simulated ranks (``rank r`` of ``world_size``
streams in one process, each drawing its own share of the data, as the ranks of a run do) over a mixed set of
samples: 30% text-only, the others one picture whose sides are drawn between 224 and 1792 px, its patch count
computed with Qwen2-VL's ``smart_resize`` (patch 14, merge 2, ``min_pixels`` 56 x 56, ``max_pixels``
28 x 28 x 1280: up to 5120 patches, 1280 tokens) and its tokens as the model takes them (patches / 4, plus
the image's start and end tokens), plus 20 to 600 text tokens. No picture is rendered: the samples carry
empty patch tensors of the right length (the budgets count only lengths).

For each way of batching (padded and packed, ``--batch-size`` samples or rows against the budgets), per step
(one micro-batch per rank) it prints the slowest rank over the mean of the vision patches (the ViT's work)
and of the useful (non-padding) text tokens, averaged over the steps (1.00 is perfect balance; the goal for
the budgets is <= 1.10), and the useful tokens, padded tokens (the batch tensor's size), patches and samples
per rank per step. The budget ways default to the same worst-case text batch as ``--batch-size``
(``batch_tokens = batch_size x max_len``) and a patch budget near the mean patches of the ``--batch-size`` way
(padded: 20480 for 8 samples; packed: ``--packed-patches`` 32768 for 8 rows), so that a step does about the
same work both ways. The last lines compare the two per layout.

Figures (``python benchmarks/balance.py``, 20000 samples, 4 ranks, 400 steps; no timing involved):
vision max/mean padded 1.313 with batch_size 8 -> 1.096 with budgets, packed 1.110 with 8 rows -> 1.053.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.datasets.stream import BatchStream, Source, StreamConfig, sample_cost  # noqa: E402
from lavis.processors.native_image import PatchImages, smart_resize  # noqa: E402

PATCH, MERGE = 14, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
TEXT_ONLY = 0.3
SIDES = (224, 1792)
TEXT_TOKENS = (20, 600)
DEFAULTS = {"samples": 20000, "steps": 400}
QUICK = {"samples": 2000, "steps": 40}


def make_records(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` records: text tokens and, for 70% of them, one picture's grid ``(1, h, w)`` in patches."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        text = rng.randint(*TEXT_TOKENS)
        grids = []
        if rng.random() >= TEXT_ONLY:
            height, width = smart_resize(rng.randint(*SIDES), rng.randint(*SIDES), PATCH * MERGE, MIN_PIXELS, MAX_PIXELS)
            grids.append((1, height // PATCH, width // PATCH))
        tokens = text + sum(t * h * w // MERGE**2 + 2 for t, h, w in grids)
        out.append({"id": i, "tokens": tokens, "grids": grids})
    return out


def process(record: dict[str, Any]) -> dict[str, Any]:
    """A record -> a sample of the right lengths: ``input_ids`` of its tokens, empty patches per image patch."""
    grid = torch.tensor(record["grids"], dtype=torch.long).view(-1, 3)
    patches = int(grid.prod(-1).sum())
    return {"input_ids": torch.zeros(record["tokens"], dtype=torch.long), "pixel_values": PatchImages(torch.empty(patches, 0), grid)}


def count_collate(items: list) -> dict[str, Any]:
    """What a batch costs: useful tokens, padded tokens (its tensor), vision patches and samples."""
    rows = items if items and isinstance(items[0], list) else [[s] for s in items]
    costs = [[sample_cost(s) for s in row] for row in rows]
    longest = max(sum(n for n, _ in row) for row in costs)
    return {
        "tokens": sum(n for row in costs for n, _ in row),
        "padded": len(rows) * longest,
        "patches": sum(p for row in costs for _, p in row),
        "samples": sum(len(row) for row in rows),
    }


def max_over_mean(values: list[int]) -> float | None:
    total = sum(values)
    return max(values) * len(values) / total if total else None


def measure(records: list[dict[str, Any]], args: argparse.Namespace, pack: bool, **budget: int | None) -> dict[str, float]:
    """``args.steps`` lock-step micro-batches of ``args.ranks`` streams: the mean imbalance and work per step."""
    streams = [
        iter(BatchStream([Source("mixed", records)], process, count_collate,
                         StreamConfig(batch_size=args.batch_size, max_len=args.max_len, pack=pack, seed=args.seed,
                                      rank=rank, world_size=args.ranks, **budget)))
        for rank in range(args.ranks)
    ]
    vision, text, per_rank = [], [], []
    for _ in range(args.steps):
        batches = [next(s) for s in streams]
        ratio = max_over_mean([b["patches"] for b in batches])
        if ratio is not None:
            vision.append(ratio)
        text.append(max_over_mean([b["tokens"] for b in batches]))
        per_rank += batches
    return {
        "vision": statistics.mean(vision),
        "vision_worst": max(vision),
        "text": statistics.mean(text),
        "tokens": statistics.mean(b["tokens"] for b in per_rank),
        "padded": statistics.mean(b["padded"] for b in per_rank),
        "patches": statistics.mean(b["patches"] for b in per_rank),
        "samples": statistics.mean(b["samples"] for b in per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, help=f"records (default {DEFAULTS['samples']}; --quick {QUICK['samples']})")
    parser.add_argument("--steps", type=int, help=f"steps (one micro-batch per rank) per way (default {DEFAULTS['steps']})")
    parser.add_argument("--ranks", type=int, default=4, help="simulated ranks (streams of that world size)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples (rows when packed) per micro-batch, without budgets")
    parser.add_argument("--max-len", type=int, default=2048, help="tokens per sample (per packed row)")
    parser.add_argument("--batch-tokens", type=int, help="run.batch_tokens of the budget ways (default batch_size x max_len)")
    parser.add_argument("--batch-patches", type=int, default=20480, help="run.batch_patches of the padded budget way")
    parser.add_argument("--packed-patches", type=int, default=32768, help="run.batch_patches of the packed budget way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps: the code path only")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULTS
    args.samples = args.samples or sizes["samples"]
    args.steps = args.steps or sizes["steps"]
    args.batch_tokens = args.batch_tokens or args.batch_size * args.max_len

    records = make_records(args.samples, args.seed)
    patches = [sum(t * h * w for t, h, w in r["grids"]) for r in records if r["grids"]]
    print(f"{args.samples} samples ({TEXT_ONLY:.0%} text-only), pictures {SIDES[0]}-{SIDES[1]} px: "
          f"{min(patches)}-{max(patches)} patches (mean {statistics.mean(patches):.0f}); {args.ranks} ranks, {args.steps} steps")
    budget = {"batch_tokens": args.batch_tokens, "batch_patches": args.batch_patches}
    packed_budget = {"batch_tokens": args.batch_tokens, "batch_patches": args.packed_patches}
    ways = [
        (f"padded, batch_size {args.batch_size}", False, {}),
        (f"padded, budget tokens {args.batch_tokens} patches {args.batch_patches}", False, budget),
        (f"packed, {args.batch_size} rows", True, {}),
        (f"packed, budget tokens {args.batch_tokens} patches {args.packed_patches}", True, packed_budget),
    ]
    print(f"{'way':<52} {'vision max/mean':>15} {'(worst step)':>12} {'text max/mean':>13} "
          f"{'useful tok/step':>15} {'padded tok/step':>15} {'patches/step':>12} {'samples/step':>12}")
    results = {}
    for name, pack, kwargs in ways:
        r = results[name] = measure(records, args, pack, **kwargs)
        print(f"{name:<52} {r['vision']:>15.3f} {r['vision_worst']:>12.3f} {r['text']:>13.3f} "
              f"{r['tokens']:>15.0f} {r['padded']:>15.0f} {r['patches']:>12.0f} {r['samples']:>12.1f}")
    names = [name for name, _, _ in ways]
    for kind, fixed, budgeted in (("padded", names[0], names[1]), ("packed", names[2], names[3])):
        fixed, budgeted = results[fixed], results[budgeted]
        print(f"{kind}: vision max/mean {fixed['vision']:.3f} with batch_size -> {budgeted['vision']:.3f} with budgets "
              f"(goal <= 1.10); text max/mean {fixed['text']:.3f} -> {budgeted['text']:.3f}; useful tokens per step "
              f"{fixed['tokens']:.0f} -> {budgeted['tokens']:.0f} (ratio budgets / batch_size {budgeted['tokens'] / fixed['tokens']:.2f})")


if __name__ == "__main__":
    main()
