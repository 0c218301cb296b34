"""Qwen-VL's box text: ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` with coordinates in [0, 1000)."""

from __future__ import annotations

import re

BOX_PATTERN = re.compile(r"<box>\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\)</box>")


def normalize_coord(value: float, size: int) -> int:
    """Pixel coordinate -> Qwen-VL's integer in [0, 1000): ``int(v * 1000 / size)`` clamped to [0, 999]."""
    return min(max(int(value * 1000 / size), 0), 999)


def box_text(bbox: tuple[float, float, float, float], width: int, height: int) -> str:
    """Pixel box (x1, y1, x2, y2) -> ``(x1,y1),(x2,y2)`` normalised to [0, 1000)."""
    x1, y1, x2, y2 = bbox
    return (
        f"({normalize_coord(x1, width)},{normalize_coord(y1, height)}),"
        f"({normalize_coord(x2, width)},{normalize_coord(y2, height)})"
    )


def ref_box_text(phrase: str, bbox: tuple[float, float, float, float], width: int, height: int) -> str:
    """``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``."""
    return f"<ref>{phrase}</ref><box>{box_text(bbox, width, height)}</box>"


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """All ``<box>(x1,y1),(x2,y2)</box>`` in ``text`` as integer tuples in [0, 1000) space."""
    return [tuple(int(v) for v in m.groups()) for m in BOX_PATTERN.finditer(text)]
