"""The arguments every project command shares: ``--cfg-path`` (a file, else a shipped project by name),
``--options`` and ``--list-projects``."""

from __future__ import annotations

import argparse

from lavis.common.resources import find_project


def project_parser(description: str | None, cfg_help: str, **kwargs) -> argparse.ArgumentParser:
    """A parser with the shared arguments; a command adds its own before :func:`parse_project_args`."""
    parser = argparse.ArgumentParser(description=description, **kwargs)
    parser.add_argument("--cfg-path", help=f"{cfg_help}: a file, else a shipped project by name; see --list-projects")
    parser.add_argument("--options", nargs="+", default=[], help="overrides: dotted.key=value ...")
    parser.add_argument("--list-projects", action="store_true",
                        help="print where the shipped configs and projects are, and the projects, then exit")
    return parser


def parse_project_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``--cfg-path`` is required unless ``--list-projects``, and resolved by :func:`find_project`."""
    args = parser.parse_args(argv)
    if args.cfg_path is None and not args.list_projects:
        parser.error("the following arguments are required: --cfg-path")
    if args.cfg_path is not None:
        args.cfg_path = str(find_project(args.cfg_path))
    return args
