"""Training throughput of a ~1B-parameter VLM on the GPUs present: tokens/s, memory, step time, MFU.

    torchrun --standalone --nproc_per_node <gpus> benchmarks/gpu_throughput.py [--batch-size 4]
        [--max-len 2048] [--warmup 3] [--steps 10] [--frozen-vision] [--no-gradient-checkpointing]
        [--attn auto|sdpa|flash_attention_2] [--peak-tflops T] [--world DIR] [--options key=value ...]
    python benchmarks/gpu_throughput.py ...             # one GPU
    python benchmarks/gpu_throughput.py --dry-run      # the same code path on the CPU, tiny model
    python benchmarks/gpu_throughput.py --quick        # the dry run with 1 timed step (every benchmark's quick mode)

The model is projects/sft.yaml with a ViT-L/14 CLIP tower (304M) at 224 px without class token, Qwen-VL's
resampler with 256 queries and a Qwen2 LLM (hidden 2048, MLP 5504, 16 layers, 16 heads and 16 KV heads,
vocabulary 151936, untied LM head): about 1.1B parameters without the input embedding and LM head,
1.76B with them (the parameter report is printed). It trains under FSDP2 in bf16 (fp32 master weights,
parameters gathered in bf16) with SDPA, or flash-attention 2 when ``flash_attn`` imports, on rows packed
to ``--max-len`` from the synthetic SFT conversations, every component trainable (Qwen-VL's stage 2;
``--frozen-vision`` for stage 3), activation checkpointing on the ViT and LLM blocks. ``--options`` are
applied last. Each step is ``IterRunner.train_step`` on ``grad_accum`` micro-batches from the runner's
own data loader; the ``--warmup`` steps are not timed, each timed step is closed by a device sync.

``--dry-run``: one process on the CPU, fp32, the tiny model of projects/sft.yaml, rows of 256 tokens,
batch 2, 1 warm-up and 2 timed steps, a 64-scene synthetic world in a temporary directory; the same
table (MFU only against ``--peak-tflops``).

Reported (global = summed over ranks): tokens/s, the input tokens (padding excluded) of the timed steps
over their wall time, data waits included; per GPU = global / ranks; step time (mean and median) and
the part of it spent waiting for data; peak memory per rank (``torch.cuda.max_memory_allocated`` and
``max_memory_reserved``, warm-up included); and MFU = model FLOPs per second per GPU / peak dense bf16
FLOP/s of the GPU (no sparsity): H200 and H100 SXM 989.4e12, H100 NVL 835e12, H100 PCIe 756e12,
L40S 362e12, A100 312e12, A10G 70e12; ``--peak-tflops`` overrides; another GPU gets no MFU.

Model FLOPs per optimiser step (the usual 6ND estimate, per component). A component does 2 FLOPs per
parameter per token forward, 2 more backward for the gradient of its input when it or anything before
it trains, and 2 more for its weight gradients when it trains: factor f = 6 for a trained component,
4 for a frozen one after a trained one, 2 for a frozen ViT (forward only). Activation-checkpoint
recomputation is not counted (this is MFU, not hardware FLOPs utilisation).

    LLM      f_llm * N_dense * input_tokens                 N_dense: LLM parameters without the input
                                                            embedding and the LM head
           + f_llm * N_head * target_tokens                 the framework applies the LM head only at
                                                            supervised positions (VisionLanguageModel.token_losses)
           + 2 * f_llm * layers * (heads * head_dim) * pairs
                                                            attention scores and weighted sum: 4 FLOPs
                                                            per query-key pair and channel forward;
                                                            pairs = causal query-key pairs of each packed
                                                            sample (block-diagonal), sum of n(n+1)/2
    ViT      images * (f_vit * N_vit * patches + 2 * f_vit * blocks * width * patches^2)
    adapter  images * f_adapter * N_adapter * patches       every adapter parameter applied once per
                                                            patch (exact for linear/MLP adapters; for the
                                                            resampler with 256 queries on 256 patches its
                                                            per-query and per-patch projections count the
                                                            same; its cross-attention scores, < 1%, are left out)

With f = 6 the LLM terms are 6 x N x tokens + 12 x layers x hidden x pairs, pairs being tokens x the
mean attended length.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.common.config import Config, load_config  # noqa: E402
from lavis.datasets.synthetic.world import ensure_world  # noqa: E402
from lavis.models.vlm import VisionLanguageModel  # noqa: E402
from lavis.runners import build_runner  # noqa: E402
from lavis.runners.strategies import Strategy, build_strategy  # noqa: E402

from machine import warn_if_busy  # noqa: E402  (benchmarks/machine.py)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s by torch.cuda.get_device_name() substring, first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
GPU_MODEL = [
    "model.vision.name=vit_large_patch14_clip_224",
    "model.vision.model_kwargs=null",  # drop the tiny preset's ViT shape: timm's own ViT-L/14
    "model.vision.class_token=false",
    "model.vision.image_size=224",
    "model.image_processor.image_size=224",
    "model.adapter.num_queries=256",
    "model.llm.config.hidden_size=2048",
    "model.llm.config.intermediate_size=5504",
    "model.llm.config.num_hidden_layers=16",
    "model.llm.config.num_attention_heads=16",
    "model.llm.config.num_key_value_heads=16",
    "model.llm.config.vocab_size=151936",
    "model.llm.config.tie_word_embeddings=false",
    "model.llm.config.initializer_range=0.02",
    "run.strategy=fsdp",
    "run.precision=bf16",
    "run.device=cuda",
]
DRY_RUN = ["run.strategy=single", "run.precision=fp32", "run.device=cpu"]
DRY_WORLD_SIZES = {"train": 64, "val": 8, "test": 8}
# (gpu, dry run) defaults of the flags that differ between the two.
DEFAULTS = {"batch_size": (4, 2), "max_len": (2048, 256), "warmup": (3, 1), "steps": (10, 2), "num_workers": (4, 0)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="one CPU process, tiny model, fp32")
    parser.add_argument("--quick", action="store_true", help="the dry run with 1 timed step: seconds, with or without CUDA")
    parser.add_argument("--batch-size", type=int, help="packed rows per micro-batch per rank (4; dry run 2)")
    parser.add_argument("--max-len", type=int, help="tokens per packed row (2048; dry run 256)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (3; dry run 1)")
    parser.add_argument("--steps", type=int, help="timed steps (10; dry run 2)")
    parser.add_argument("--num-workers", type=int, help="data loader workers per rank (4; dry run 0)")
    parser.add_argument("--frozen-vision", action="store_true", help="freeze the ViT (stage 3) instead of training it")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing of the ViT and LLM blocks (default on)")
    parser.add_argument("--attn", choices=("auto", "sdpa", "flash_attention_2"), default="auto",
                        help="LLM attention; auto: flash_attention_2 on GPUs when flash_attn imports, else sdpa")
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s per device for MFU (default: by GPU name)")
    parser.add_argument("--world", help="synthetic world directory shared by all ranks (default data/synthetic, "
                        "used whatever its size; dry run: a small one in a temporary directory)")
    parser.add_argument("--options", nargs="*", default=[], help="config overrides, applied last")
    args = parser.parse_args()
    if args.quick:
        args.dry_run = True
        args.steps = 1 if args.steps is None else args.steps
    for name, (gpu, dry) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else gpu)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def attention_implementation(choice: str, dry_run: bool) -> str:
    """``--attn`` resolved: ``auto`` is flash-attention 2 on GPUs when ``flash_attn`` imports, else SDPA."""
    if choice != "auto":
        return choice
    if dry_run:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def config_options(args: argparse.Namespace, world: Path, output_dir: Path) -> list[str]:
    """``--options`` for projects/sft.yaml: the preset, this run's flags, then the user's overrides."""
    checkpointing = str(args.gradient_checkpointing).lower()
    return [
        *(DRY_RUN if args.dry_run else GPU_MODEL),
        f"model.llm.attn_implementation={attention_implementation(args.attn, args.dry_run)}",
        f"model.freeze.vision={'frozen' if args.frozen_vision else 'trainable'}",
        f"model.vision.gradient_checkpointing={checkpointing}",
        f"model.llm.gradient_checkpointing={checkpointing}",
        f"datasets.synthetic_sft.ann_path={world / 'sft_train.json'}",
        f"datasets.synthetic_sft.image_root={world}",
        f"datasets.synthetic_sft.synthetic_root={world}",
        "run.pack=true",
        f"run.max_len={args.max_len}",
        f"run.batch_size={args.batch_size}",
        f"run.num_workers={args.num_workers}",
        f"run.max_steps={args.warmup + args.steps}",
        "run.lr=1.0e-4",
        "run.lr_scheduler=constant",
        "run.warmup_steps=0",
        f"run.save_every={10**9}",
        f"run.output_dir={output_dir}",
        *args.options,
    ]


# --------------------------------------------------------------------------- model FLOPs


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs per unit of work of one configured VLM (the formula: the module docstring)."""

    per_input_token: float
    per_target_token: float
    per_attended_pair: float
    per_image: float

    @classmethod
    def of(cls, model: VisionLanguageModel) -> FlopModel:
        """From the built model's freeze policies, parameter counts and shapes (sharded or not: a
        DTensor's ``numel`` is that of the whole parameter)."""
        trains = {name: policy.registry_name == "trainable" for name, policy in model.freeze_policies.items()}

        def factor(component: str, upstream: bool) -> int:
            return 2 + 2 * (trains[component] or upstream) + 2 * trains[component]

        f_vit = factor("vision", False)
        f_adapter = factor("adapter", trains["vision"])
        f_llm = factor("llm", trains["vision"] or trains["adapter"])

        llm = model.llm
        embedding, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
        dense = sum(p.numel() for p in llm.parameters()) - embedding.numel() - (0 if head is embedding else head.numel())
        config = llm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

        patches = math.prod(model.vision.grid)
        vit_params = sum(p.numel() for p in model.vision.parameters())
        adapter_params = sum(p.numel() for p in model.adapter.parameters())
        vit_blocks = len(model.blocks()["vision"])
        return cls(
            per_input_token=f_llm * dense,
            per_target_token=f_llm * head.numel(),
            per_attended_pair=2 * f_llm * config.num_hidden_layers * config.num_attention_heads * head_dim,
            per_image=f_vit * (vit_params * patches + 2 * vit_blocks * model.vision.width * patches**2)
            + f_adapter * adapter_params * patches,
        )

    def flops(self, input_tokens: float, target_tokens: float, pairs: float, images: float) -> float:
        """FLOPs of this much work (global counts: the FLOPs of all ranks together)."""
        return (
            self.per_input_token * input_tokens
            + self.per_target_token * target_tokens
            + self.per_attended_pair * pairs
            + self.per_image * images
        )


def attended_pairs(batch: dict[str, Any]) -> int:
    """Query-key pairs of the batch's causal attention: each (packed) sample attends within itself,
    padding excluded. Read from what the attention kernel gets: a block-diagonal mask ``[B, 1, L, L]``
    or flash-attention's ``cu_seq_lens`` (where each padding position is a sequence of its own, and
    attends to itself only), or a padding mask ``[B, L]`` for unpacked rows."""
    padding = batch["input_ids"].numel() - batch["num_input_tokens"]
    mask = batch["attention_mask"]
    if mask is None:
        cu = batch["attention_kwargs"]["cu_seq_lens_q"].long()
        lengths = cu[1:] - cu[:-1]
        return int((lengths * (lengths + 1) // 2).sum()) - padding
    if mask.dim() == 4:
        return int(mask.sum()) - padding
    lengths = mask.sum(dim=1).long()
    return int((lengths * (lengths + 1) // 2).sum())


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """Peak dense bf16 FLOP/s of one device, and where the number comes from."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value, f"{name}, dense bf16"
    return None, f"no peak known for '{name}': pass --peak-tflops"


# --------------------------------------------------------------------------- the run


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Config, process group and synthetic world; then the benchmark; then clean up."""
    args = parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on GPUs, or pass --dry-run for the CPU check")
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as tmp:
        scratch = Path(tmp)
        world = Path(args.world) if args.world else (scratch / "world" if args.dry_run else REPO / "data" / "synthetic")
        cfg = load_config(REPO / "projects" / "sft.yaml", config_options(args, world, scratch / "output"))
        strategy = build_strategy(cfg.run.strategy)
        strategy.setup(cfg.run.device, cfg.run.dist_timeout_s)
        try:
            if strategy.is_main:
                if args.dry_run:
                    warn_if_busy()
                # A small world only in our own temporary directory: ensure_world replaces a world of other sizes.
                ensure_world(world, sizes=DRY_WORLD_SIZES if args.dry_run and not args.world else None)
            strategy.barrier()
            run_benchmark(args, cfg, strategy)
        finally:
            strategy.teardown()


def run_benchmark(args: argparse.Namespace, cfg: Config, strategy: Strategy) -> None:
    """Build the run, train ``--warmup`` then ``--steps`` timed steps, print the table on rank 0."""
    runner = build_runner(cfg, strategy)
    device, run = runner.device, cfg.run
    flop_model = FlopModel.of(runner.model)
    if strategy.is_main:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        checkpointed = [c for c in ("vision", "llm") if getattr(cfg.model, c).params["gradient_checkpointing"]]
        print(
            f"gpu_throughput{' --dry-run' if args.dry_run else ''}: {strategy.world_size} x {name}; "
            f"{run.precision}, strategy {run.strategy.type}, "
            f"attention {runner.model.llm.config._attn_implementation}, rows packed to {run.max_len} tokens, "
            f"{run.batch_size} rows/rank x grad_accum {run.grad_accum}; vision {runner.model.freeze_policies['vision']}, "
            f"activation checkpointing: {', '.join(checkpointed) or 'none'}; "
            f"{args.warmup} warm-up + {args.steps} timed steps",
            flush=True,
        )
        print(runner.model.parameter_report(), flush=True)

    runner.wrapped.train()
    batches = runner.data_iterator()
    for step in range(args.warmup):
        runner.set_lr(step)
        runner.train_step([next(batches) for _ in range(run.grad_accum)])
    synchronize(device)

    step_times: list[float] = []
    data_waits: list[float] = []
    input_tokens = target_tokens = 0
    local = torch.zeros(4, dtype=torch.float64)  # this rank's attended pairs, images, row positions, skipped samples
    for step in range(args.warmup, args.warmup + args.steps):
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(run.grad_accum)]
        fetched = time.perf_counter()
        runner.set_lr(step)
        stats = runner.train_step(micro_batches)
        synchronize(device)
        step_times.append(time.perf_counter() - start)
        data_waits.append(fetched - start)
        input_tokens += stats.input_tokens
        target_tokens += stats.target_tokens
        for batch in micro_batches:
            local += torch.tensor([
                attended_pairs(batch), len(batch["pixel_values"]), batch["input_ids"].numel(), sum(batch["skipped"].values()),
            ], dtype=torch.float64)
    pairs, images, positions, skipped = strategy.all_reduce(local.to(device)).tolist()
    memory = (
        (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None
    )
    memory_by_rank = strategy.all_gather_object(memory)
    if not strategy.is_main:
        return

    elapsed = sum(step_times)
    ranks = strategy.world_size
    flops = flop_model.flops(input_tokens, target_tokens, pairs, images)
    per_device = flops / elapsed / ranks
    peak, peak_source = peak_flops(device, args.peak_tflops)
    unit = "GPU" if device.type == "cuda" else "rank"
    rows = [
        ("tokens/s (global)", f"{input_tokens / elapsed:.1f}"),
        (f"tokens/s per {unit}", f"{input_tokens / elapsed / ranks:.1f}"),
        ("step time (mean)", f"{1e3 * elapsed / len(step_times):.1f} ms"),
        ("step time (median)", f"{1e3 * statistics.median(step_times):.1f} ms"),
        ("data wait per step (mean)", f"{1e3 * statistics.mean(data_waits):.1f} ms"),
        ("input tokens per step", f"{input_tokens / args.steps:.0f} (rows {100 * input_tokens / positions:.1f}% full)"),
        ("target tokens per step", f"{target_tokens / args.steps:.0f}"),
        ("images per step", f"{images / args.steps:.1f}"),
        ("skipped samples", f"{skipped:.0f}"),
        ("model TFLOP per step", f"{flops / args.steps / 1e12:.4g}"),
        (f"model TFLOP/s per {unit}", f"{per_device / 1e12:.4g}"),
        ("MFU", f"{100 * per_device / peak:.1f}% of {peak / 1e12:.1f} TFLOP/s ({peak_source})" if peak else f"n/a ({peak_source})"),
    ]
    for rank, usage in enumerate(memory_by_rank):
        value = f"allocated {usage[0] / 2**30:.2f} GiB, reserved {usage[1] / 2**30:.2f} GiB" if usage else "n/a (CPU)"
        rows.append((f"peak memory rank {rank}", value))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)


if __name__ == "__main__":
    main()
