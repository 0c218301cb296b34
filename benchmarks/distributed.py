"""Distributed training: FSDP's memory per rank and DDP's communication overhead, on 2 CPU ranks.

    python benchmarks/distributed.py [--hidden 384 --layers 6 --intermediate 1024] [--rounds 3]
                                     [--steps 6 --warmup 2 --batch-size 4] [--options key=value ...]
    python benchmarks/distributed.py --quick     # a 1-layer LLM, 1 step per run, 1 round: the code path only

Prints, side by side in one run (rows = measurement; columns = one process | 2 ranks | ratio | goal):

(a) Memory of parameters + gradients + AdamW state held by one rank under ``run.strategy=fsdp`` with
    2 ranks (rank 0), against one process (``run.strategy=single``); goal <= 0.6x. Measured, not
    computed: after a few optimiser steps (so that AdamW state exists) one more forward + backward
    runs, and the bytes of the tensors the rank holds are summed: parameters (FSDP2's are DTensors:
    their local shard), their ``.grad`` (DTensor shards too) and every tensor in ``optimizer.state``
    (DTensor -> local). Activations, buffers and gathered (unsharded) parameters in flight are not
    included; the script checks that every FSDP unit is back to sharded when it measures.
(b) Median step time of ``run.strategy=ddp`` with 2 ranks against one process at the same per-rank
    batch, one thread per process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``): the cost of
    the gradient all-reduce and DDP's bookkeeping; goal <= 1.2x. Every process trains on the same
    fixed batches (made once here and handed to each worker), so that the computation per rank is
    identical and only the communication differs; the 2-rank run thus processes twice the samples
    per optimiser step. The two are run alternately in ``--rounds`` rounds (order swapped every
    round) to spread machine noise over both; warm-up steps are excluded.

The model is the tiny preset with its LLM widened (``--hidden``, ``--layers``, ...), so that the
parameters outweigh what every rank holds whatever the sharding, and with every component trained
(``model.freeze.vision=trainable``). Workers are this script with ``--worker``, launched by
``python -m torch.distributed.run --standalone --nproc_per_node 2`` for 2 ranks and by ``python``
for one process; they write JSON that this process tabulates.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import QUICK_WORLD_SIZES, other_cpu_use, warn_if_busy  # noqa: E402  (benchmarks/machine.py)

MEMORY_GOAL = 0.6
# --quick: the smallest model and runs that still take every path (FSDP, DDP, memory, timing).
QUICK = {"hidden": 64, "layers": 1, "intermediate": 128, "heads": 2, "kv_heads": 1, "max_len": 128, "steps": 1,
         "warmup": 1, "rounds": 1, "num_batches": 1, "mem_steps": 1, "mem_batch_size": 1, "batch_size": 1}
TIME_GOAL = 1.2
MIB = 2**20


# ---------------------------------------------------------------------------------------- config


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=384, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=6, help="LLM decoder layers")
    parser.add_argument("--intermediate", type=int, default=1024, help="LLM MLP size")
    parser.add_argument("--heads", type=int, default=6, help="LLM attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="LLM key/value heads")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--options", nargs="*", default=[], help="further config overrides, for every process")


def config_options(args: argparse.Namespace, strategy: str, batch_size: int, max_steps: int, output_dir: Path) -> list[str]:
    world = Path(args.world)
    return [
        f"run.strategy={strategy}",
        "run.device=cpu",
        "run.num_workers=0",
        f"run.batch_size={batch_size}",
        f"run.max_len={args.max_len}",
        f"run.max_steps={max_steps}",
        f"run.save_every={max_steps + 1000}",  # nothing saved
        f"run.log_every={max_steps + 1000}",
        "run.warmup_steps=1",
        f"run.output_dir={output_dir}",
        "model.freeze.vision=trainable",
        f"model.llm.config.hidden_size={args.hidden}",
        f"model.llm.config.intermediate_size={args.intermediate}",
        f"model.llm.config.num_hidden_layers={args.layers}",
        f"model.llm.config.num_attention_heads={args.heads}",
        f"model.llm.config.num_key_value_heads={args.kv_heads}",
        f"datasets.synthetic_sft.ann_path={world / 'sft_train.json'}",
        f"datasets.synthetic_sft.image_root={world}",
        f"datasets.synthetic_sft.synthetic_root={world}",
        *args.options,
    ]


# ---------------------------------------------------------------------------------------- workers


def build(args: argparse.Namespace, batch_size: int, max_steps: int):
    """This process's strategy (process group joined) and runner."""
    from lavis.common.config import load_config
    from lavis.runners import build_runner
    from lavis.runners.strategies import build_strategy

    out = Path(args.out)
    cfg = load_config("projects/sft.yaml", config_options(args, args.strategy, batch_size, max_steps, out.parent / f"run-{out.stem}"))
    strategy = build_strategy(cfg.run.strategy)
    strategy.setup(cfg.run.device, cfg.run.dist_timeout_s)
    return strategy, build_runner(cfg, strategy)


def local_bytes(tensor) -> int:
    """Bytes of the part of ``tensor`` this rank holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def unsharded_fsdp_params(model) -> int | None:
    """FSDP2 parameters currently gathered (not in their sharded state); None when not FSDP or unknown."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
    except ImportError:
        return None
    count, seen = 0, False
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group  # private API: only a sanity check
        for fsdp_param in group.fsdp_params if group is not None else []:
            seen = True
            count += fsdp_param.sharded_state != ShardedState.SHARDED
    return count if seen else None


def teardown(strategy) -> None:
    """Leave the process group once nothing holds it (call after dropping the runner), as train.py
    does: destroying the group while a DDP wrapper still holds it can abort the process at exit."""
    gc.collect()
    strategy.teardown()


def worker_memory(args: argparse.Namespace) -> dict:
    import torch

    strategy, runner = build(args, args.batch_size, args.steps + 1)
    batches = runner.data_iterator()
    for step in range(args.steps):  # optimiser steps: AdamW state exists afterwards
        runner.set_lr(step)
        runner.train_step([next(batches) for _ in range(runner.run.grad_accum)])
    # train_step ends with optimizer.zero_grad(set_to_none=True), so gradients are gone after it. One
    # more forward + backward, as train_step does it (synchronised: FSDP reduce-scatters into each
    # rank's gradient shard), and no optimiser step: parameters, gradients and AdamW state all exist
    # now, as they do inside a step between backward and zero_grad.
    batch = runner.to_device(next(batches))
    with strategy.no_sync(runner.wrapped, sync=True), runner.autocast():
        out = runner.task.train_step(runner.wrapped, batch)
    out.loss_sum.backward()

    params = list(runner.model.parameters())  # the FSDP2 model is sharded in place: DTensors
    optim_state = [v for p in params for v in runner.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    # The same, counted by distinct storages (allocations): catches views into larger buffers, padding.
    storages: dict[int, int] = {}
    for t in [*params, *(p.grad for p in params if p.grad is not None), *optim_state]:
        t = t.to_local() if hasattr(t, "to_local") else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    result = {
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for v in optim_state),
        "storage_total": sum(storages.values()),
        "num_parameters": sum(p.numel() for p in params),  # whole (global) sizes
        "trainable_without_grad": sum(1 for p in params if p.requires_grad and p.grad is None),
        "unsharded_units": unsharded_fsdp_params(runner.model),
    }
    result["total"] = result["parameters"] + result["gradients"] + result["optimizer"]
    gathered = strategy.all_gather_object(result)
    del runner, batches, batch, out, params, optim_state
    teardown(strategy)
    return {"ranks": gathered}


def worker_time(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    strategy, runner = build(args, args.batch_size, args.warmup + args.steps)
    if args.batches:  # the same batches in every process: identical computation per rank
        with open(args.batches, "rb") as f:
            fixed = pickle.load(f)
        source = (fixed[i % len(fixed)] for i in range(10**9))
    else:  # each rank's own data stream
        source = runner.data_iterator()
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        micro = [next(source) for _ in range(runner.run.grad_accum)]
        runner.set_lr(step)
        start, start_cpu = time.perf_counter(), time.process_time()
        runner.train_step(micro)  # ends with a device sync (the step's totals reduced across ranks)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)  # this process, all its threads (gloo's too)
    gathered = strategy.all_gather_object(times[args.warmup:])
    del runner, source, micro
    teardown(strategy)
    return {
        "world_size": len(gathered),
        "threads": torch.get_num_threads(),
        "times": gathered[0],
        "rank_medians": [statistics.median(t) for t in gathered],
        "cpu_times": cpu_times[args.warmup:],  # rank 0's
    }


def run_worker(args: argparse.Namespace) -> None:
    result = {"memory": worker_memory, "time": worker_time}[args.worker](args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- main


def launch(args: argparse.Namespace, what: str, strategy: str, nproc: int, out: Path, extra: list[str]) -> dict:
    """Run a worker in one process or under torchrun with ``nproc`` ranks; returns its JSON."""
    script = [str(Path(__file__).resolve()), "--worker", what, "--strategy", strategy, "--out", str(out), *extra]
    model = [
        "--world", args.world, "--hidden", str(args.hidden), "--layers", str(args.layers),
        "--intermediate", str(args.intermediate), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
        "--max-len", str(args.max_len),
    ]
    if args.options:
        model += ["--options", *args.options]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script, *model]
    else:
        cmd = [sys.executable, *script, *model]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = out.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(log_path.read_text()[-12000:])
        raise RuntimeError(f"worker failed (exit {proc.returncode}; log {log_path}): {' '.join(cmd)}")
    return json.loads(out.read_text())


def make_batches(args: argparse.Namespace, work: Path) -> tuple[Path, list[dict], int]:
    """The fixed batches every timing worker trains on (drawn once from the single-process stream)."""
    from lavis.common.config import load_config
    from lavis.runners import build_runner

    cfg = load_config("projects/sft.yaml", config_options(args, "single", args.batch_size, 10, work / "run-batches"))
    runner = build_runner(cfg)
    stream = runner.data_iterator()
    batches = [next(stream) for _ in range(args.num_batches)]
    path = work / "batches.pkl"
    with open(path, "wb") as f:
        pickle.dump(batches, f)
    return path, batches, sum(p.numel() for p in runner.model.parameters())


def fmt_mib(n: float) -> str:
    return f"{n / MIB:9.2f} MiB"


def row(name: str, one: str, two: str, ratio: float | str, goal: str) -> str:
    r = f"{ratio:6.3f}" if isinstance(ratio, float) else ratio
    return f"{name:<34}{one:>14}{two:>14}{r:>9}   {goal}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="per-rank batch of the timing runs (b)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process per round (b)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each timing run (b)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of one process / 2 ranks (b)")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct fixed batches, cycled (b)")
    parser.add_argument("--rank-data", action="store_true", help="(b): each rank draws its own data instead of the fixed batches")
    parser.add_argument("--mem-steps", type=int, default=2, help="optimiser steps before measuring memory (a)")
    parser.add_argument("--mem-batch-size", type=int, default=2, help="per-rank batch of the memory runs (a)")
    parser.add_argument("--world", default=None, help="synthetic world to use (default: made in a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--quick", action="store_true", help="seconds per launch: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                        for k, v in QUICK.items()) + ", a small world (numbers mean nothing)")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.chdir(REPO)
        run_worker(args)
        return
    if args.quick:
        vars(args).update(QUICK)
    else:
        warn_if_busy()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        from lavis.datasets.synthetic.world import ensure_world

        os.chdir(REPO)
        if args.world is None:
            sizes = QUICK_WORLD_SIZES if args.quick else {"train": 200, "val": 8, "test": 8}
            args.world = str(ensure_world(work / "world", sizes=sizes))
        batches_path, batches, num_params = make_batches(args, work)
        tokens = [int(b["attention_mask"].sum()) for b in batches]
        print(
            f"model: tiny preset, LLM hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
            f"heads {args.heads}/{args.kv_heads} kv; everything trained; {num_params / 1e6:.2f} M parameters (fp32)"
        )

        # (a) memory: FSDP with 2 ranks vs one process
        mem_args = ["--steps", str(args.mem_steps), "--batch-size", str(args.mem_batch_size)]
        mem_one = launch(args, "memory", "single", 1, work / "mem-single.json", mem_args)["ranks"][0]
        mem_all = launch(args, "memory", "fsdp", 2, work / "mem-fsdp.json", mem_args)["ranks"]
        mem_two = mem_all[0]

        # (b) step time: DDP with 2 ranks vs one process, alternating rounds
        time_args = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        if not args.rank_data:
            time_args += ["--batches", str(batches_path)]
        rounds: list[dict[str, dict]] = []
        others: list[float] = []  # cores used by other processes just before each round
        for r in range(args.rounds):
            order = [("single", 1), ("ddp", 2)]
            if r % 2:
                order.reverse()
            others.append(other_cpu_use(0.5))
            rounds.append({s: launch(args, "time", s, n, work / f"time-{s}-{r}.json", time_args) for s, n in order})
    except BaseException:
        print(f"kept {work} (worker logs: *.log)", file=sys.stderr)
        raise
    else:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    one_all = [t for rd in rounds for t in rd["single"]["times"]]
    two_all = [t for rd in rounds for t in rd["ddp"]["times"]]
    one_med, two_med = statistics.median(one_all), statistics.median(two_all)

    print()
    print(row("measurement", "one process", "2 ranks", "ratio", "goal"))
    print("-" * 80)
    print("(a) per-rank memory, FSDP (rank 0 of 2) vs single process; measured after backward")
    for key in ("parameters", "gradients", "optimizer", "total"):
        print(row(f"    {key}", fmt_mib(mem_one[key]), fmt_mib(mem_two[key]), mem_two[key] / mem_one[key],
                  f"<= {MEMORY_GOAL}" if key == "total" else ""))
    print(row("    total, by allocated storages", fmt_mib(mem_one["storage_total"]), fmt_mib(mem_two["storage_total"]),
              mem_two["storage_total"] / mem_one["storage_total"], ""))
    print(
        f"    rank totals: {', '.join(fmt_mib(m['total']).strip() for m in mem_all)}; "
        f"trainable params without a gradient: {mem_one['trainable_without_grad']} / {mem_two['trainable_without_grad']}; "
        f"FSDP params not resharded at measurement: {mem_two['unsharded_units']}"
    )
    print(f"(b) step time, DDP vs single process; {rounds[0]['single']['threads']} thread per process, "
          f"per-rank batch {args.batch_size} ({'own data per rank' if args.rank_data else 'the same fixed batches everywhere'})")
    for r, rd in enumerate(rounds):
        o, t = statistics.median(rd["single"]["times"]), statistics.median(rd["ddp"]["times"])
        first = "one process first" if r % 2 == 0 else "2 ranks first"
        print(row(f"    round {r + 1} median", f"{o * 1e3:8.1f} ms", f"{t * 1e3:8.1f} ms", t / o,
                  f"({first}; other processes used {others[r]:.1f} cores)"))
    print(row(f"    median step ({len(one_all)} / {len(two_all)} steps)", f"{one_med * 1e3:8.1f} ms",
              f"{two_med * 1e3:8.1f} ms", two_med / one_med, f"<= {TIME_GOAL}"))
    one_cpu = statistics.median(t for rd in rounds for t in rd["single"]["cpu_times"])
    two_cpu = statistics.median(t for rd in rounds for t in rd["ddp"]["cpu_times"])
    print(row("    median CPU time per step, rank 0", f"{one_cpu * 1e3:8.1f} ms", f"{two_cpu * 1e3:8.1f} ms", two_cpu / one_cpu,
              "(all of the process's threads; info)"))
    print(f"    samples per optimiser step: {args.batch_size} vs {2 * args.batch_size} (same per-rank batch; "
          f"{statistics.mean(tokens):.0f} tokens per batch on average); {args.warmup} warm-up steps per run excluded")
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
