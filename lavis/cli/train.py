"""Train a vision-language model: ``python train.py --cfg-path projects/sft.yaml [--options k=v ...]``."""

from __future__ import annotations

import argparse
import gc
import sys

from lavis.cli.arguments import parse_project_args, project_parser
from lavis.common.config import ConfigError, load_config
from lavis.common.registry import RegistryError
from lavis.common.resources import describe
from lavis.datasets.builders.base import AnnotationError
from lavis.tracking.logging import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = project_parser(__doc__, "project YAML (projects/pretrain.yaml, eval/demo)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parse_project_args(parser, argv)


# What the process-group backends say when a peer died or stopped answering (gloo raises plain RuntimeErrors).
COMMUNICATION_ERRORS = ("Timed out", "timed out", "Connection reset", "Connection closed", "NCCL", "gloo", "c10d")


def is_communication_error(err: RuntimeError) -> bool:
    """Whether ``err`` is a failed collective (a peer died or hung) rather than a fault of this rank."""
    from torch.distributed import DistError

    return isinstance(err, DistError) or any(marker in str(err) for marker in COMMUNICATION_ERRORS)


def print_plan(cfg) -> None:
    """Parameters per component and the per-rank memory of the run, from the model built on the meta device."""
    from lavis.common.dist import launched_world_size
    from lavis.models import build_model
    from lavis.runners.strategies import build_strategy

    model, _ = build_model(cfg.model, meta=True)
    print("# parameters (built on the meta device: no weights read)")
    print("\n".join(f"# {line}" for line in model.parameter_report().splitlines()))
    world_size = cfg.run.world_size_hint or launched_world_size()
    strategy = build_strategy(cfg.run.strategy)
    estimate = strategy.memory_estimate(model, cfg.run.precision, world_size)
    gib = 1024**3
    print(f"# per-rank memory at {world_size} rank(s), run.strategy={cfg.run.strategy.type}, run.precision="
          f"{cfg.run.precision} (set the world size with --options run.world_size_hint=N; activations not included)")
    for name, label in (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "AdamW state")):
        print(f"#   {label:<28} {estimate[name] / gib:9.2f} GiB")
    total = estimate["parameters"] + estimate["gradients"] + estimate["optimizer"]
    print(f"#   {'total (persistent)':<28} {total / gib:9.2f} GiB")
    if "gathered" in estimate:
        print(f"#   {'+ gathered units (transient)':<28} {estimate['gathered'] / gib:9.2f} GiB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_projects:
        print(describe(), end="")
        return 0
    setup_logging()
    try:
        cfg = load_config(args.cfg_path, args.options)
    except (ConfigError, RegistryError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        print_plan(cfg)
        return 0
    from lavis.common.checkpoint import CheckpointError
    from lavis.datasets.stream import UnusableData
    from lavis.runners import build_runner
    from lavis.runners.checkpointer import OutputDirInUse
    from lavis.runners.iter_runner import NonFiniteLoss
    from lavis.runners.strategies import build_strategy
    from lavis.tasks.evaluation import EvaluationFailed

    strategy = build_strategy(cfg.run.strategy)
    try:
        cfg.check_local_paths()
        strategy.setup(cfg.run.device, cfg.run.dist_timeout_s)  # join the process group first
        runner = build_runner(cfg, strategy)
    except (ConfigError, RegistryError, AnnotationError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        runner.train()
    except (OutputDirInUse, CheckpointError, ConfigError) as err:  # ConfigError: what a task finds at start
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, UnusableData, EvaluationFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, UnusableData):
            print(f"the skipped samples are listed in {cfg.run.output_dir}/skipped.jsonl", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted at step {runner.step}; the last complete checkpoint is intact: continue with "
              "run.resume=auto", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if strategy.world_size == 1 or not is_communication_error(err):
            raise
        print(
            f"error: rank {strategy.rank} of {strategy.world_size}: a collective operation failed ({err}). Another rank "
            f"died or stopped answering for run.dist_timeout_s={cfg.run.dist_timeout_s:g}; see the first error in the "
            "job's log. The last complete checkpoint is intact: continue with run.resume=auto",
            file=sys.stderr,
        )
        return 1
    # Release the wrapped model before leaving the process group: DDP's reducer holds the group's
    # threads, and destroying the group under it can abort the process at exit.
    del runner
    gc.collect()
    strategy.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
