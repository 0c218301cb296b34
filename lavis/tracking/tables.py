"""The results table and logged samples as text: their columns, an aligned text table and Markdown.

Presentation only (plain rows of dicts in, text out), so that the loggers here and the evaluation in
:mod:`lavis.tasks.evaluation`, which builds the rows, share it without tracking importing tasks.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

TABLE_COLUMNS = ("benchmark", "split", "metric", "value", "samples", "skipped")
SAMPLE_COLUMNS = ("id", "prompt", "output", "prediction", "reference", "image")


def _cells(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    # A table value of None: no score (every sample skipped).
    return [f"{row[c]:.4f}" if isinstance(row[c], float) else "n/a" if row[c] is None and c == "value" else str(row[c])
            for c in columns]


def results_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table under :data:`TABLE_COLUMNS`."""
    cells = [list(TABLE_COLUMNS)] + [_cells(row, TABLE_COLUMNS) for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The rows as a Markdown table under ``columns``. ``<`` and ``>`` are escaped: a prompt's
    ``<img>…</img>`` would otherwise be rendered as an HTML image."""

    def cell(text: str) -> str:
        return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in _cells(row, columns)) + " |" for row in rows]
    return "\n".join(lines)
