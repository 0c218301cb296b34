"""DPO's shared prompt: preference pairs per second of training with one row per pair (the prompt and its
pictures once) and with packing, against chosen and rejected as two separate samples, side by side in one run.

    python benchmarks/preference.py [--pairs 512] [--batch-size 8] [--max-len 256] [--rounds 6] [--options key=value ...]
    python benchmarks/preference.py --quick     # tiny sizes on a small world, seconds: the code path only

The tiny model of projects/sft.yaml (ViT frozen, adapter and LLM trained, as its SFT stage) under ``run.task=dpo``
with a frozen-copy reference, on the synthetic world's preference pairs (``preference_train.json``: "is there"
questions and captions, one picture each). The pairs are processed once, then batched three ways:

  (a) separate: each pair as two samples, prompt + chosen and prompt + rejected, one per row, padded to the
      longest row of the batch (TRL's concatenated forward): the picture goes through the visual path twice,
      the prompt through the LLM twice;
  (b) one row per pair: the prompt and its picture once, then both answers (the rejected one masked from the
      chosen one, :class:`~lavis.tasks.dpo.PairCollator`);
  (c) packed: (b) with several pairs per row of ``max_len`` tokens (``run.pack``).

(a) and (b) take ``batch_size`` pairs per step, (c) ``batch_size`` rows. Every way trains on the same pairs, and
each step is ``IterRunner.train_step`` (the reference's forward, the policy's forward and backward, clipping,
AdamW), the ways interleaved in ``--rounds`` slices after a warm-up. Prints pairs/s of each way and the ratios
(b) / (a) and (c) / (a) (goal >= 1.5x for the shared visual pass with packing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from packing import finish, measure, pack_rows  # noqa: E402  (benchmarks/packing.py: the same step loop)

from lavis.common.config import load_config  # noqa: E402
from lavis.datasets.stream import vision_patches  # noqa: E402
from lavis.processors.errors import SkipSample  # noqa: E402
from lavis.runners import build_runner  # noqa: E402
from lavis.tasks.dpo import PairCollator  # noqa: E402

from machine import quick_workdir, warn_if_busy  # noqa: E402  (benchmarks/machine.py)

PAIRS = [
    "run.task=dpo",
    "datasets.synthetic_sft.builder=qwen_vl_preference",
    "datasets.synthetic_sft.ann_path=data/synthetic/preference_train.json",
]
QUICK = {"pairs": 12, "batch_size": 2, "max_len": 512, "rounds": 1, "epochs": 1, "warmup": 1}
# max_len: projects/dpo.yaml's. On the CPU a packed row attends through a dense block mask, its cost growing with
# the row's square: 512-token rows gained nothing over one row per pair there (flash-attention's varlen path would).
DEFAULTS = {"pairs": 512, "batch_size": 8, "max_len": 256, "rounds": 6, "epochs": 1, "warmup": 3}


def processed_pairs(runner, n: int) -> list[dict]:
    """The first ``n`` usable pairs of the configured dataset, processed as the stream processes them."""
    processor = runner.task.sample_processor(runner.model, runner.processors)
    data = runner.sources[0].data
    pairs = []
    for i in range(len(data)):
        try:
            pairs.append(processor(data[i]))
        except SkipSample:
            continue
        if len(pairs) == n:
            break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, help=f"preference pairs (default {DEFAULTS['pairs']})")
    parser.add_argument("--batch-size", type=int, help=f"pairs per step, rows when packed (default {DEFAULTS['batch_size']})")
    parser.add_argument("--max-len", type=int, help=f"tokens per packed row (default {DEFAULTS['max_len']})")
    parser.add_argument("--rounds", type=int, help=f"interleaved slices of each way's batches (default {DEFAULTS['rounds']})")
    parser.add_argument("--epochs", type=int, help=f"passes over the pairs per way (default {DEFAULTS['epochs']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per way first (default {DEFAULTS['warmup']})")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--quick", action="store_true", help="seconds, on a small world (numbers mean nothing)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if args.quick or getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        os.chdir(quick_workdir("preference"))  # a small world at data/synthetic, the project's relative paths
    else:
        os.chdir(REPO)
        warn_if_busy()
    cfg = load_config(REPO / "projects" / "sft.yaml", [
        *PAIRS, f"run.output_dir={tempfile.mkdtemp(prefix='preference_')}", "run.num_workers=0",
        f"run.max_len={args.max_len}", f"run.batch_size={args.batch_size}", f"run.max_steps={10**6}", *args.options,
    ])
    runner = build_runner(cfg)
    pairs = processed_pairs(runner, args.pairs)
    pad_id = runner.processors.tokenizer.pad_id
    separate, shared = PairCollator(pad_id, shared_prompt=False), PairCollator(pad_id)
    size = args.batch_size
    ways = {
        "(a) separate samples": [finish(separate(pairs[i : i + size])) for i in range(0, len(pairs), size)],
        "(b) one row per pair": [finish(shared(pairs[i : i + size])) for i in range(0, len(pairs), size)],
        "(c) packed": [finish(shared(rows)) for rows in pack_rows(pairs, args.max_len, size)],
    }
    times = measure(runner, ways, args)

    lengths = [len(p["input_ids"]) for p in pairs]
    prompts = [p["prompt_len"] for p in pairs]
    print(f"{len(pairs)} pairs; prompt tokens median {int(statistics.median(prompts))} (picture included), pair row "
          f"median {int(statistics.median(lengths))}; torch threads {torch.get_num_threads()}; reference "
          f"{cfg.run.dpo.reference}; {args.rounds} interleaved rounds")
    print(f"{'way':<22} {'steps':>5} {'pairs/step':>10} {'rows/step':>9} {'tokens/step':>11} {'images/step':>11} "
          f"{'ms/step':>8} {'pairs/s':>8}")
    rate = {}
    for name, batches in ways.items():
        steps = len(batches)
        rate[name] = sum(b["num_samples"] for b in batches) * args.epochs / sum(times[name])
        print(f"{name:<22} {steps:>5} {sum(b['num_samples'] for b in batches) / steps:>10.1f} "
              f"{sum(b['input_ids'].shape[0] for b in batches) / steps:>9.1f} "
              f"{sum(b['num_input_tokens'] for b in batches) / steps:>11.0f} "
              f"{sum(vision_patches(b['pixel_values']) for b in batches) / steps:>11.1f} "
              f"{statistics.median(times[name]) * 1e3:>8.1f} {rate[name]:>8.1f}")
    base = rate["(a) separate samples"]
    print(f"ratio one row per pair / separate : {rate['(b) one row per pair'] / base:.2f}x")
    print(f"ratio packed / separate           : {rate['(c) packed'] / base:.2f}x   (goal >= 1.5x)")


if __name__ == "__main__":
    main()
