"""Memory and speed of fine-tuning one model four ways: full, full with the ViT frozen, LoRA, Q-LoRA.

    python benchmarks/finetune_memory.py [--modes full,full-frozen-vit,lora] [--steps 3] [--batch-size 1]
        [--seq-len 512] [--grad-accum 1] [--gradient-checkpointing] [--options key=value ...]
    python benchmarks/finetune_memory.py --dry-run       # the same path on the tiny model (LoRA r 8), seconds on a CPU
    python benchmarks/finetune_memory.py --full-size     # Qwen-VL at 9.6B on one GPU: LoRA and Q-LoRA
    python benchmarks/finetune_memory.py --quick         # the dry run with 1 timed step (every benchmark's quick mode)

The model (``--options`` over projects/sft.yaml and its synthetic conversations, random init, nothing
downloaded): a ViT-B/16 at 224 px without class token (86M), Qwen-VL's resampler with 256 queries, and a
12-layer Qwen2 (hidden 1024, MLP 2816, 16 heads, the full 151,936-token vocabulary, embeddings tied to
the LM head): about 0.40B parameters. Modes, as Qwen-VL's finetune.py trains:

    full             every component trainable
    full-frozen-vit  the ViT frozen, the resampler and the LLM trained (finetune.py --fix_vit)
    lora             LoRA r 64, alpha 16, dropout 0.05 on the LLM's q/k/v/o_proj, up/gate_proj
                     (finetune.py's c_attn, attn.c_proj, w1, w2); everything else frozen: under
                     --use_lora finetune.py skips --fix_vit's branch and peft freezes every non-LoRA
                     parameter, the resampler included (``--options model.freeze.adapter=trainable``
                     trains it anyway)
    qlora            the same LoRA over the LLM's linear layers in 4-bit NF4 (bitsandbytes; CUDA only)

Each mode runs in its own subprocess (this script with ``--worker``), which builds the run with
``lavis.runners.build_runner`` (model, freeze policies, AdamW groups, data) and trains with
``IterRunner.train_step``: one warm-up step, then ``--steps`` timed steps of ``--grad-accum``
micro-batches of ``--batch-size`` samples, each right-padded to ``--seq-len`` tokens as finetune.py
pads to ``model_max_length`` (longer samples are cut, or skipped when the cut splits an image). Columns:

    trainable     parameters in the optimiser (and their share of all parameters)
    optim state   bytes of every tensor in ``optimizer.state`` after the steps (exp_avg, exp_avg_sq, step)
    peak memory   CUDA: torch.cuda.max_memory_allocated of the worker from the end of the build (so not
                  the bf16 weights Q-LoRA quantises at start); CPU: the worker's peak RSS (ru_maxrss:
                  Python and its libraries, weights, gradients, optimiser state, activations)
    s/step        median wall time of the timed optimiser steps (device-synchronised), and their range

and the ratio of LoRA's optimiser state to full fine-tuning's (goal <= 5%). On CUDA the run is bf16
autocast over fp32 weights (the full-size LLM: bf16 weights); on the CPU fp32.

``--full-size`` (CUDA only): configs/models/presets/qwen_vl_7b.yaml (ViT-bigG/14 at 448 px, resampler, a
7.7B Qwen-7B-shaped LLM in bf16: 9.66B parameters before LoRA) randomly initialised directly on the GPU (the framework
builds on the CPU, or on the meta device for counting only: materialising a meta model would need every
initialiser and buffer re-run, so this script instead builds inside ``torch.device("cuda")``), batch 1,
512 tokens, gradient accumulation 8, activation checkpointing, modes lora and qlora, printed beside
Qwen-VL's README profile (see ``QWEN_VL_REFERENCE``). ``FULL_SIZE_CAVEAT`` says what differs from theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.common.config import Config, load_config  # noqa: E402
from lavis.datasets.synthetic.world import ensure_world  # noqa: E402
from lavis.processors.conversation import IGNORE_INDEX  # noqa: E402
from lavis.runners import build_runner  # noqa: E402
from lavis.runners.iter_runner import IterRunner  # noqa: E402

from gpu_throughput import DRY_WORLD_SIZES, synchronize  # noqa: E402  (benchmarks/gpu_throughput.py)
from machine import warn_if_busy  # noqa: E402  (benchmarks/machine.py)

# Freeze policies of vision, adapter and LLM per mode; LoRA's r, alpha and dropout come from the size.
MODES = {
    "full": ("trainable", "trainable", "trainable"),
    "full-frozen-vit": ("frozen", "trainable", "trainable"),
    "lora": ("frozen", "frozen", "lora"),
    "qlora": ("frozen", "frozen", "qlora"),
}
CUDA_ONLY_MODES = {"qlora"}
LORA_GOAL = 0.05  # LoRA's optimiser state at most this share of full fine-tuning's

BENCH_MODEL = [  # over projects/sft.yaml (the tiny preset)
    "model.vision.name=vit_base_patch16_224",
    "model.vision.model_kwargs=null",  # drop the tiny preset's ViT shape: timm's own ViT-B/16
    "model.vision.class_token=false",
    "model.vision.image_size=224",
    "model.image_processor.image_size=224",
    "model.adapter.num_queries=256",
    "model.llm.config.hidden_size=1024",
    "model.llm.config.intermediate_size=2816",
    "model.llm.config.num_hidden_layers=12",
    "model.llm.config.num_attention_heads=16",
    "model.llm.config.num_key_value_heads=16",
    "model.llm.config.vocab_size=151936",
    "model.llm.config.initializer_range=0.02",
]
FULL_SIZE_MODEL = [  # over configs/models/presets/qwen_vl_7b.yaml: random init, the embedded tokenizer
    "model.vision.pretrained=null",
    "model.llm.pretrained=null",
    "model.tokenizer.type=hf_tokenizer",
    "model.tokenizer.path=null",
]
PRESET_7B = REPO / "configs" / "models" / "presets" / "qwen_vl_7b.yaml"
SFT_PROJECT = REPO / "projects" / "sft.yaml"

# Qwen-VL's README, "Profiling of Memory and Speed" (github.com/QwenLM/Qwen-VL): one A100-SXM4-80G, CUDA 11.8,
# PyTorch 2.0, batch 1, gradient accumulation 8, one image per sample; memory (their "G") / s per iteration,
# the 512-token column (LoRA (Chat): no trainable embeddings or LM head, as our lora mode).
QWEN_VL_REFERENCE = {"lora": "LoRA (Chat) 23.6G / 2.3 s/it", "qlora": "Q-LoRA 17.2G / 4.5 s/it"}
QWEN_VL_SETTINGS = "A100-SXM4-80G, CUDA 11.8, PyTorch 2.0, batch 1, grad accum 8, 512 tokens, one image per sample"
FULL_SIZE_CAVEAT = (
    "ours keeps the frozen ViT and resampler (1.94B parameters) in fp32 where Qwen-VL holds them in bf16 "
    "(about 3.9 GB more); their Q-LoRA trains on the GPTQ Int4 Qwen-VL-Chat in fp16, ours on NF4 (bitsandbytes) "
    "quantised at start"
)


@dataclass(frozen=True)
class Size:
    """What a size of run sets by default: the project, the model options and the flags' defaults."""

    project: Path
    model: list[str]
    cpu_modes: tuple[str, ...]
    cuda_modes: tuple[str, ...]
    steps: int
    seq_len: int
    grad_accum: int
    gradient_checkpointing: bool
    lora_rank: int = 64  # finetune.py's (alpha 16, dropout 0.05 whatever the rank)


ALL_MODES = tuple(MODES)
CPU_MODES = tuple(m for m in MODES if m not in CUDA_ONLY_MODES)
SIZES = {
    # The tiny LLM (hidden 128) gets rank 8: rank 64 would be half its width, not a low-rank update.
    "dry-run": Size(SFT_PROJECT, [], CPU_MODES, ALL_MODES, steps=2, seq_len=256, grad_accum=1,
                    gradient_checkpointing=False, lora_rank=8),
    "default": Size(SFT_PROJECT, BENCH_MODEL, CPU_MODES, ALL_MODES, steps=3, seq_len=512, grad_accum=1,
                    gradient_checkpointing=False),
    "full-size": Size(PRESET_7B, FULL_SIZE_MODEL, ("lora", "qlora"), ("lora", "qlora"), steps=3, seq_len=512,
                      grad_accum=8, gradient_checkpointing=True),
}


# --------------------------------------------------------------------------- arguments and config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--dry-run", action="store_true", help="the tiny model of projects/sft.yaml, a couple of steps")
    size.add_argument("--full-size", action="store_true", help="Qwen-VL 9.6B on one GPU, LoRA and Q-LoRA (CUDA only)")
    size.add_argument("--quick", action="store_true", help="the dry run with 1 timed step: seconds, with or without CUDA")
    parser.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: those the size and device allow)")
    parser.add_argument("--steps", type=int, help="timed optimiser steps after one warm-up step (3; dry run 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch")
    parser.add_argument("--seq-len", type=int, help="tokens per sample, padded or cut (512; dry run 256)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (1; full size 8)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="activation checkpointing of the ViT and LLM blocks (off; full size on)")
    parser.add_argument("--world", help="synthetic world directory (default: a small one in a temporary directory)")
    parser.add_argument("--options", nargs="*", default=[], help="config overrides for every mode, applied last")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # internal: measure one mode
    parser.add_argument("--out", help=argparse.SUPPRESS)  # internal: the worker's JSON result
    args = parser.parse_args()
    if args.quick:
        args.dry_run = True
        args.steps = 1 if args.steps is None else args.steps
    args.size = "dry-run" if args.dry_run else "full-size" if args.full_size else "default"
    defaults = SIZES[args.size]
    for name in ("steps", "seq_len", "grad_accum", "gradient_checkpointing"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    if min(args.steps, args.batch_size, args.seq_len, args.grad_accum) < 1:
        parser.error("--steps, --batch-size, --seq-len and --grad-accum must be >= 1")
    return args


def selected_modes(args: argparse.Namespace, cuda: bool) -> list[str]:
    """``--modes``, checked against the device; or the size's default modes for it."""
    size = SIZES[args.size]
    if not args.modes:
        return list(size.cuda_modes if cuda else size.cpu_modes)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    if not cuda and CUDA_ONLY_MODES & set(modes):
        sys.exit(f"mode(s) {sorted(CUDA_ONLY_MODES & set(modes))} need CUDA (bitsandbytes' 4-bit layers); no GPU here")
    return modes


def freeze_options(mode: str, lora_rank: int) -> list[str]:
    """``--options`` setting the mode's freeze policy per component."""
    vision, adapter, llm = MODES[mode]
    options = [f"model.freeze.vision={vision}", f"model.freeze.adapter={adapter}", f"model.freeze.llm={llm}"]
    if llm in ("lora", "qlora"):
        options += [f"model.freeze.llm.r={lora_rank}", "model.freeze.llm.alpha=16", "model.freeze.llm.dropout=0.05"]
    return options


def config_for(args: argparse.Namespace, mode: str, scratch: Path) -> Config:
    """The run of ``mode``: the size's project and model, the mode's freeze policies, this run's flags."""
    size = SIZES[args.size]
    cuda = torch.cuda.is_available()
    world = Path(args.world)
    checkpointing = str(args.gradient_checkpointing).lower()
    return load_config(size.project, [
        *size.model,
        *freeze_options(mode, size.lora_rank),
        f"model.vision.gradient_checkpointing={checkpointing}",
        f"model.llm.gradient_checkpointing={checkpointing}",
        "datasets.synthetic_sft.builder=qwen_vl_conversation",  # the full-size preset has no datasets
        f"datasets.synthetic_sft.ann_path={world / 'sft_train.json'}",
        f"datasets.synthetic_sft.image_root={world}",
        f"datasets.synthetic_sft.synthetic_root={world}",
        "run.strategy=single",
        f"run.device={'cuda' if cuda else 'cpu'}",
        f"run.precision={'bf16' if cuda else 'fp32'}",
        "run.pack=false",
        f"run.max_len={args.seq_len}",
        f"run.batch_size={args.batch_size}",
        f"run.grad_accum={args.grad_accum}",
        "run.num_workers=0",
        f"run.max_steps={1 + args.steps}",
        "run.lr_scheduler=constant",
        "run.warmup_steps=0",
        "run.max_skip_ratio=1.0",  # multi-image conversations cut at --seq-len are skipped: not a failure here
        f"run.output_dir={scratch / mode}",  # never written: the runner writes only in train()
        *args.options,
    ])


# --------------------------------------------------------------------------- one mode (a worker process)


def padded_to(batch: dict[str, Any], length: int, pad_id: int) -> dict[str, Any]:
    """``batch`` right-padded to ``length`` tokens (unsupervised, masked out)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    return {
        **batch,
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
        "labels": F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
        "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0),
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimiser holds as state (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors held at once; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def timed_steps(runner: IterRunner, steps: int, seq_len: int) -> list[float]:
    """One warm-up step, then ``steps`` timed optimiser steps (the runner's own ``train_step``)."""
    batches = runner.data_iterator()
    pad_id = runner.processors.tokenizer.pad_id
    runner.wrapped.train()
    times = []
    for step in range(1 + steps):
        micro_batches = [padded_to(next(batches), seq_len, pad_id) for _ in range(runner.run.grad_accum)]
        runner.set_lr(step)
        start = time.perf_counter()
        runner.train_step(micro_batches)
        synchronize(runner.device)
        times.append(time.perf_counter() - start)
    return times[1:]


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Build ``mode``'s run, train it, and report what the table shows."""
    with tempfile.TemporaryDirectory(prefix="finetune_memory_") as scratch:
        cfg = config_for(args, mode, Path(scratch))
        # Full size: parameters are created, and randomly initialised, on the GPU; never whole on the CPU.
        with torch.device("cuda") if args.full_size else nullcontext():
            runner = build_runner(cfg)
        if runner.device.type == "cuda":  # from here: not the build's transients (Q-LoRA's bf16 weights before 4-bit)
            torch.cuda.reset_peak_memory_stats(runner.device)
        times = timed_steps(runner, args.steps, args.seq_len)
        return {
            "mode": mode,
            "parameters": sum(p.numel() for p in runner.model.parameters()),
            "trainable": sum(p.numel() for p in runner.trainable),
            "optimizer_bytes": optimizer_state_bytes(runner.optimizer),
            "peak_bytes": peak_memory_bytes(runner.device),
            "step_seconds": times,
            "device": runner.device.type,
        }


# --------------------------------------------------------------------------- all modes (the parent)


def run_worker(mode: str, world: Path, out: Path) -> dict[str, Any]:
    """Measure ``mode`` in a fresh process (so that no mode's memory counts in another's); its JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
               "--world", str(world), "--worker", mode, "--out", str(out)]
    print(f"measuring {mode} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        sys.exit(f"mode {mode} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def human(n: float) -> str:
    """``1234567`` -> ``1.23M``: three significant digits and a decimal prefix."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{prefix}"
    return f"{n:.3g}"


def binary(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(results: list[dict[str, Any]], reference: dict[str, str] | None) -> str:
    """One row per mode; with ``reference``, a column of Qwen-VL's figures."""
    memory = "peak CUDA alloc" if results[0]["device"] == "cuda" else "peak RSS"
    header = ["mode", "trainable", "optim state", memory, "s/step (min-max)"] + (["Qwen-VL README"] if reference else [])
    rows = [header]
    for r in results:
        share = f"{human(r['trainable'])} ({100 * r['trainable'] / r['parameters']:.2f}%)"
        times = r["step_seconds"]
        spread = f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"
        row = [r["mode"], share, binary(r["optimizer_bytes"]), binary(r["peak_bytes"]), spread]
        rows.append(row + ([reference.get(r["mode"], "")] if reference else []))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def lora_ratio_line(results: list[dict[str, Any]]) -> str | None:
    """LoRA's optimiser state against full fine-tuning's, when both ran."""
    by_mode = {r["mode"]: r for r in results}
    if "lora" not in by_mode or "full" not in by_mode:
        return None
    ratio = by_mode["lora"]["optimizer_bytes"] / by_mode["full"]["optimizer_bytes"]
    verdict = "met" if ratio <= LORA_GOAL else "NOT met"
    return f"LoRA optimiser state / full optimiser state: {100 * ratio:.2f}% (goal <= {100 * LORA_GOAL:.0f}%: {verdict})"


def describe(args: argparse.Namespace, cuda: bool, first: dict[str, Any]) -> str:
    """The table's title line: device, precision, model size (of the ``first`` result), settings."""
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    flag = {"dry-run": " --dry-run", "full-size": " --full-size"}.get(args.size, "")
    return (
        f"finetune_memory{flag}: {device}, {'bf16 autocast' if cuda else 'fp32'}, "
        f"{human(first['parameters'])} parameters ({first['mode']}), batch {args.batch_size} x {args.seq_len} tokens "
        f"x grad accum {args.grad_accum}, activation checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"LoRA r {SIZES[args.size].lora_rank}, 1 warm-up + {args.steps} timed steps"
    )


def main() -> None:
    """Parent: one worker process per mode, then the table. Worker (``--worker``): measure one mode."""
    args = parse_args()
    cuda = torch.cuda.is_available()
    if args.full_size and not cuda:
        sys.exit("--full-size needs a CUDA GPU (it trains the 9.6B Qwen-VL in bf16); none here: run without "
                 "--full-size (the 0.4B model) or with --dry-run on the CPU")
    if args.worker:
        Path(args.out).write_text(json.dumps(measure(args, args.worker)))
        return
    modes = selected_modes(args, cuda)
    with tempfile.TemporaryDirectory(prefix="finetune_memory_") as tmp:
        if not cuda:
            warn_if_busy()
        # A small world only in our own temporary directory: ensure_world replaces a world of other sizes.
        world = ensure_world(args.world or Path(tmp) / "world", sizes=None if args.world else DRY_WORLD_SIZES)
        results = [run_worker(mode, world, Path(tmp) / f"{mode}.json") for mode in modes]
    print(describe(args, cuda, results[0]))
    print(table(results, QWEN_VL_REFERENCE if args.full_size else None))
    if args.full_size:
        print(f"Qwen-VL README settings: {QWEN_VL_SETTINGS}\nnot the same: {FULL_SIZE_CAVEAT}")
    ratio = lora_ratio_line(results)
    if ratio:
        print(ratio)


if __name__ == "__main__":
    main()
