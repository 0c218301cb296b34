"""Train a vision-language model: ``python train.py --cfg-path projects/sft.yaml [--options k=v ...]``."""

from __future__ import annotations

import argparse
import sys

from lavis.common.config import ConfigError, load_config
from lavis.common.logging import setup_logging
from lavis.common.registry import RegistryError
from lavis.datasets.builders.base import AnnotationError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cfg-path", required=True, help="project YAML")
    parser.add_argument("--options", nargs="+", default=[], help="overrides: dotted.key=value ...")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.cfg_path, args.options)
    except (ConfigError, RegistryError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        from lavis.models import build_model

        model, _ = build_model(cfg.model, meta=True)
        print("# parameters (built on the meta device: no weights read)")
        print("\n".join(f"# {line}" for line in model.parameter_report().splitlines()))
        return 0
    from lavis.runners import build_runner

    try:
        runner = build_runner(cfg)
    except (ConfigError, RegistryError, AnnotationError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runner.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
