"""Plot a run's ``metrics.jsonl``: training loss, learning rate and evaluation metrics against step.

Usage: ``python -m lavis.plot <output_dir> [-o out.png]`` (default ``<output_dir>/curves.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lavis.tracking.logging import read_metrics

__all__ = ["DPI", "PANEL_SIZE_INCHES", "main", "plot_metrics"]

PANEL_SIZE_INCHES = (10, 3)
DPI = 100
EVAL_PREFIX = "eval/"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
    return [step for step, _ in points], [value for _, value in points]


def plot_metrics(records: Iterable[Mapping[str, Any]], out_path: str | Path, title: str) -> Path:
    """Write a PNG of loss (top), lr (middle) and any ``eval/...`` metrics (bottom) against step.

    Raises ``ValueError`` if no record has a ``step`` and a ``loss``.
    """
    records = sorted((r for r in records if _is_number(r.get("step"))), key=lambda r: r["step"])
    loss_steps, losses = _series(records, "loss")
    if not losses:
        raise ValueError("no records with a step and a loss")
    eval_keys = sorted({key for r in records for key in r if key.startswith(EVAL_PREFIX)})
    eval_series = {key: _series(records, key) for key in eval_keys}
    eval_series = {key: series for key, series in eval_series.items() if series[0]}

    panels = 3 if eval_series else 2
    width, panel_height = PANEL_SIZE_INCHES
    figure = Figure(figsize=(width, panel_height * panels), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    figure.suptitle(title)

    axes[0].plot(loss_steps, losses, color="tab:blue")
    axes[0].set_ylabel("loss")

    axes[1].plot(*_series(records, "lr"), color="tab:orange")
    axes[1].set_ylabel("lr")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    if eval_series:
        for key, (steps, values) in eval_series.items():
            axes[2].plot(steps, values, marker="o", label=key.removeprefix(EVAL_PREFIX))
        axes[2].set_ylabel("eval")
        axes[2].legend(fontsize="small")

    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, format="png")
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: plot ``<output_dir>/metrics.jsonl``; errors exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m lavis.plot", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a run's output directory (holds metrics.jsonl)")
    parser.add_argument("-o", "--out", type=Path, help="PNG to write (default: <output_dir>/curves.png)")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    metrics_path = args.output_dir / "metrics.jsonl"
    if not args.output_dir.is_dir():
        return fail(f"no such directory: {args.output_dir}")
    if not metrics_path.is_file():
        return fail(f"no metrics.jsonl in {args.output_dir}")
    try:
        records = read_metrics(metrics_path)
    except json.JSONDecodeError as err:
        return fail(f"{metrics_path} is not valid JSON lines: {err}")
    out_path = args.out if args.out is not None else args.output_dir / "curves.png"
    try:
        written = plot_metrics(records, out_path, title=args.output_dir.resolve().name)
    except ValueError as err:
        return fail(f"{metrics_path}: {err}")
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
