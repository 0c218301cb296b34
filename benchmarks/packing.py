"""Packing vs padding: useful (non-pad) tokens per second of training on the SFT + multi-task mix.

    python benchmarks/packing.py [--samples 512] [--batch-size 8] [--max-len 512] [--rounds 4]
                                 [--epochs 1] [--sft-ratio 1.0] [--group-mult 8] [--options key=value ...]
    python benchmarks/packing.py --quick     # tiny sizes on a small world, seconds: the code path only
    python benchmarks/packing.py --native [--quick] [same options]   # the mixed-resolution case below

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

``--native``: the same three ways and measure, on mixed-resolution samples (Qwen2-VL's native resolution)
instead of the multi-task mix. The model is a tiny Qwen2-VL: ``qwen2_vl_vit`` + ``patch_merger`` +
``qwen2_vl_lm`` (M-RoPE; packing is exact under it), built from projects/sft.yaml with ``NATIVE_MODEL``
(``--options`` override it), trained as that project trains (ViT frozen, adapter and LLM trained: Qwen2-VL's
fine-tuning stage; ``--options model.freeze.vision=trainable`` trains it too). The samples are generated
into a temporary directory: random smooth pictures whose sides range independently from 224 to 1344 px
(aspect ratios up to 6:1), one per image conversation, plus ``--text-ratio`` text-only conversations of
varied length; the image processor keeps them at their own size (``max_pixels`` = 1344 x 1344, no picture
is scaled down). CPU scale: the ViT's patches are 28 px and one frame (``temporal_patch_size`` 1) where
Qwen2-VL's are 14 px x 2 frames, so a 1344 px square is 48 x 48 patches and 576 LLM tokens (Qwen2-VL:
2304), a 224 px one 16 tokens (Qwen2-VL: 64): the same 36-fold spread of lengths, at a quarter of the
tokens. The LLM is the larger part of a step per token, as in Qwen2-VL-7B. ``max_len`` (default 768) holds
the longest sample, so none is dropped. Prints the same table and the ratios packing / pad-to-max_len and
packing / pad-to-longest grouped (target >= 2x for the former; ``--group-mult 1`` makes the latter plain
pad-to-longest batches). Under SDPA's block-diagonal mask a packed row still pays attention over its whole
length, where a length-grouped batch of short samples is short: against grouping, packing's gain is
fewer steps, not fewer attention FLOPs (``cu_seqlens`` isolation, flash-attention on GPU, removes that).
"""

from __future__ import annotations

import argparse
import json
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
DEFAULTS = {"samples": 512, "batch_size": 8, "max_len": 512, "rounds": 4, "epochs": 1, "warmup": 3, "group_mult": 8}
# --native: the mixed-resolution case (its --quick keeps the picture sizes' range, with few samples)
NATIVE_DEFAULTS = {**DEFAULTS, "samples": 256, "max_len": 768, "sides": [224, 1344]}
NATIVE_QUICK = {**QUICK, "samples": 6, "max_len": 768, "sides": [224, 448]}

# The tiny Qwen2-VL of --native, over projects/sft.yaml (see the module docstring for the CPU-scale patches).
NATIVE_LLM = ("{model_type: qwen2_vl, hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, "
              "intermediate_size: 512, vocab_size: 1088, bos_token_id: null, eos_token_id: null, max_position_embeddings: 4096, "
              "rope_parameters: {rope_type: default, rope_theta: 10000.0, mrope_section: [4, 6, 6]}, tie_word_embeddings: true}")
NATIVE_PATCH = {"patch_size": 28, "temporal_patch_size": 1, "spatial_merge_size": 2}
NATIVE_MODEL = (
    "model.vision.type=qwen2_vl_vit",
    "model.vision.config={model_type: qwen2_vl, depth: 2, embed_dim: 64, hidden_size: 128, num_heads: 2, mlp_ratio: 2, "
    + ", ".join(f"{k}: {v}" for k, v in NATIVE_PATCH.items()) + "}",
    "model.adapter.type=patch_merger",
    "model.llm.type=qwen2_vl_lm",
    f"model.llm.config={NATIVE_LLM}",
    "model.image_processor.type=qwen2_vl_image",
    f"model.image_processor.patch_size={NATIVE_PATCH['patch_size']}",
    f"model.image_processor.temporal_patch_size={NATIVE_PATCH['temporal_patch_size']}",
    f"model.image_processor.merge_size={NATIVE_PATCH['spatial_merge_size']}",
    "model.image_processor.min_pixels=3136",
    f"model.image_processor.max_pixels={1344 * 1344}",  # no picture of the range is scaled down
)
WORDS = ("the a red green blue yellow orange purple circle square triangle shape small large left right top bottom "
         "middle next to near above below picture colour what where how many is are on of and in there").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def native_records(root: Path, n: int, text_ratio: float, sides: list[int], seed: int) -> list[dict[str, Any]]:
    """``n`` Qwen-VL conversations written with their pictures under ``root``: one picture of random size
    each (each side log-uniform in ``sides`` px, smooth random colours), or, with probability ``text_ratio``,
    several text-only turns."""
    from PIL import Image

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        if rng.random() < text_ratio:
            turns = []
            for _ in range(rng.randint(1, 4)):
                turns += [{"from": "user", "value": sentence(rng, 4, 30)}, {"from": "assistant", "value": sentence(rng, 4, 60)}]
            records.append({"id": f"text-{i}", "conversations": turns})
            continue
        width, height = (round(sides[0] * (sides[1] / sides[0]) ** rng.random()) for _ in range(2))
        coarse = torch.randint(0, 256, (3, 6, 6), generator=gen, dtype=torch.uint8).float()[None]
        pixels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        Image.fromarray(pixels.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(root / "images" / f"{i}.png")
        question = f"Picture 1: <img>images/{i}.png</img>\n{sentence(rng, 3, 15)}?"
        turns = [{"from": "user", "value": question}, {"from": "assistant", "value": sentence(rng, 2, 30)}]
        records.append({"id": f"image-{i}", "conversations": turns})
    return records


def measure(runner, ways: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Each way's step times: ``IterRunner.train_step`` on each of its batches, ``--epochs`` passes, the ways
    interleaved in ``--rounds`` slices, after ``--warmup`` untimed steps each."""

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
    return times


def batch_ways(runner, samples: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], PackCollator]:
    """The same samples batched the three ways (see the module docstring), and the packing collator."""
    pad_id = runner.processors.tokenizer.pad_id
    pad_collate = PadCollator(pad_id)
    pack_collate = runner.task.collator(runner.processors, runner.model.llm.config._attn_implementation)
    assert isinstance(pack_collate, PackCollator), "the project is expected to pack (run.pack: true)"
    rng = random.Random(args.seed)
    ways = {
        "pad to max_len": [
            finish(pad_to(pad_collate(samples[i : i + args.batch_size]), args.max_len, pad_id))
            for i in range(0, len(samples), args.batch_size)
        ],
        "pad to longest, grouped": [finish(pad_collate(b)) for b in length_grouped(samples, args.batch_size, args.group_mult, rng)],
        "packed": [finish(pack_collate(rows)) for rows in pack_rows(samples, args.max_len, args.batch_size)],
    }
    return ways, pack_collate


def report(ways: dict[str, list[dict[str, Any]]], times: dict[str, list[float]], args: argparse.Namespace) -> dict[str, float]:
    """Print the table of the ways; their useful tokens per second."""
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
    return rate


def multitask(args: argparse.Namespace) -> None:
    """The SFT + multi-task mix on projects/multitask.yaml's tiny model."""
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
    drawn, skipped = draw_samples(runner, args.samples, cfg.run.seed + args.seed)
    lengths = [len(s["input_ids"]) for s in drawn]
    samples = [s for s in drawn if len(s["input_ids"]) <= args.max_len]
    dropped = len(drawn) - len(samples)
    ways, pack_collate = batch_ways(runner, samples, args)
    times = measure(runner, ways, args)

    print(
        f"{len(drawn)} samples drawn (skipped while drawing: {dict(skipped) or 0}); length min/median/mean/max "
        f"{min(lengths)}/{int(statistics.median(lengths))}/{statistics.mean(lengths):.0f}/{max(lengths)}; "
        f"{dropped} longer than max_len {args.max_len} dropped, {len(samples)} used"
    )
    print(
        f"batch: {args.batch_size} rows x <= {args.max_len} tokens; torch threads {torch.get_num_threads()}; "
        f"{args.epochs} pass(es), {args.rounds} interleaved rounds, attention isolation {pack_collate.isolation}"
    )
    rate = report(ways, times, args)
    print(f"ratio packed / pad to max_len          : {rate['packed'] / rate['pad to max_len']:.2f}x   (target >= 3x)")
    print(f"ratio packed / pad to longest, grouped : {rate['packed'] / rate['pad to longest, grouped']:.2f}x   (target >= 1.3x)")


def native(args: argparse.Namespace) -> None:
    """Mixed-resolution conversations and text on a tiny Qwen2-VL (projects/sft.yaml with ``NATIVE_MODEL``)."""
    work = Path(tempfile.mkdtemp(prefix="packing_native_"))
    records = native_records(work / "data", args.samples, args.text_ratio, args.sides, args.seed)
    (work / "data" / "conversations.json").write_text(json.dumps(records))
    cfg = load_config(
        REPO / "projects" / "sft.yaml",
        [
            f"run.output_dir={work / 'out'}",
            "run.num_workers=0",
            "run.pack=true",
            f"run.max_len={args.max_len}",
            f"run.batch_size={args.batch_size}",
            f"run.max_steps={10**6}",  # a flat lr over the benchmark: no schedule end
            f"datasets.synthetic_sft.ann_path={work / 'data' / 'conversations.json'}",
            f"datasets.synthetic_sft.image_root={work / 'data'}",
            "datasets.synthetic_sft.synthetic_root=null",
            *NATIVE_MODEL,
            *args.options,
        ],
    )
    runner = build_runner(cfg)
    drawn, skipped = draw_samples(runner, args.samples, cfg.run.seed + args.seed)
    lengths = [len(s["input_ids"]) for s in drawn]
    samples = [s for s in drawn if len(s["input_ids"]) <= args.max_len]
    grids = torch.cat([s["pixel_values"].grid_thw for s in drawn])
    tokens = [runner.model.image_tokens(g) for g in grids]
    ways, pack_collate = batch_ways(runner, samples, args)
    times = measure(runner, ways, args)

    patch = runner.model.vision.patch_size
    sides = (grids[:, 1:] * patch).flatten().tolist()
    print(
        f"mixed resolution: {len(drawn)} samples drawn (skipped while drawing: {dict(skipped) or 0}), "
        f"{len(drawn) - len(grids)} text-only; {len(grids)} pictures of {min(sides)} to {max(sides)} px a side, "
        f"{min(tokens)} to {max(tokens)} image tokens (median {int(statistics.median(tokens))})"
    )
    print(
        f"length min/median/mean/max {min(lengths)}/{int(statistics.median(lengths))}/{statistics.mean(lengths):.0f}/{max(lengths)}; "
        f"{len(drawn) - len(samples)} longer than max_len {args.max_len} dropped, {len(samples)} used"
    )
    trained = ", ".join(name for name, part in (("vision", runner.model.vision), ("adapter", runner.model.adapter),
                                                ("llm", runner.model.llm)) if any(p.requires_grad for p in part.parameters()))
    print(
        f"batch: {args.batch_size} rows x <= {args.max_len} tokens; torch threads {torch.get_num_threads()}; trained: {trained}; "
        f"{args.epochs} pass(es), {args.rounds} interleaved rounds, attention isolation {pack_collate.isolation}"
    )
    rate = report(ways, times, args)
    print(f"mixed resolution ratio packed / pad to max_len          : {rate['packed'] / rate['pad to max_len']:.2f}x   (target >= 2x)")
    print(f"mixed resolution ratio packed / pad to longest, grouped : "
          f"{rate['packed'] / rate['pad to longest, grouped']:.2f}x   (group mult {args.group_mult})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native", action="store_true", help="the mixed-resolution case (tiny Qwen2-VL) instead of the multi-task mix")
    parser.add_argument("--samples", type=int, help=f"fixed samples drawn once (default {DEFAULTS['samples']}; "
                                                    f"--native {NATIVE_DEFAULTS['samples']})")
    parser.add_argument("--batch-size", type=int, help=f"rows per step (samples per step when padded; default {DEFAULTS['batch_size']})")
    parser.add_argument("--max-len", type=int,
                        help=f"tokens per row (default {DEFAULTS['max_len']}; --native {NATIVE_DEFAULTS['max_len']})")
    parser.add_argument("--rounds", type=int, help=f"interleaved slices of each way's batches (default {DEFAULTS['rounds']})")
    parser.add_argument("--epochs", type=int, help=f"passes over the samples per way (default {DEFAULTS['epochs']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per way first (default {DEFAULTS['warmup']})")
    parser.add_argument("--sft-ratio", type=float, default=1.0, help="SFT conversations' ratio (multi-task ratios sum to 1)")
    parser.add_argument("--group-mult", type=int,
                        help=f"(b): length-grouping pool = this x batch size (LLaVA: world size; default {DEFAULTS['group_mult']})")
    parser.add_argument("--text-ratio", type=float, default=0.25, help="--native: the share of text-only conversations")
    parser.add_argument("--sides", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help=f"--native: the pictures' sides, px (default {NATIVE_DEFAULTS['sides']}; --quick {NATIVE_QUICK['sides']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--quick", action="store_true",
                        help=f"seconds, on a small world: {', '.join(f'{k}={v}' for k, v in QUICK.items())} "
                             f"(--native: {NATIVE_QUICK['samples']} samples of pictures up to {NATIVE_QUICK['sides'][1]} px; "
                             "numbers mean nothing)")
    args = parser.parse_args()
    sizes = (NATIVE_QUICK if args.quick else NATIVE_DEFAULTS) if args.native else (QUICK if args.quick else DEFAULTS)
    for key, value in sizes.items():
        if args.quick or getattr(args, key) is None:
            setattr(args, key, value)
    if args.native:
        os.chdir(tempfile.mkdtemp(prefix="packing_native_cwd_"))  # generates its own data (absolute paths)
        if not args.quick:
            warn_if_busy()
        native(args)
        return
    if args.quick:
        os.chdir(quick_workdir("packing"))  # a small world at data/synthetic, the projects' relative paths
    else:
        os.chdir(REPO)  # the projects' data paths are relative to the repository root
        warn_if_busy()
    multitask(args)


if __name__ == "__main__":
    main()
