"""Qwen-VL's OCR quad text: ``<ref>text</ref><quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>``.

Coordinates are normalised like boxes (:func:`lavis.processors.boxes.normalize_coord`): integers in
[0, 1000), ``int(v * 1000 / size)`` clamped to 999. Points are kept in the order given (by convention
clockwise from the top-left corner of the text).
"""

from __future__ import annotations

import re

from lavis.processors.boxes import normalize_coord

Point = tuple[float, float]
Quad = tuple[Point, Point, Point, Point]

QUAD_PATTERN = re.compile(r"<quad>" + ",".join([r"\((-?\d+),(-?\d+)\)"] * 4) + r"</quad>")


def box_to_quad(bbox: tuple[float, float, float, float]) -> Quad:
    """Pixel box ``(x1, y1, x2, y2)`` -> its corners, clockwise from the top left."""
    x1, y1, x2, y2 = bbox
    return (x1, y1), (x2, y1), (x2, y2), (x1, y2)


def quad_text(quad: Quad, width: int, height: int) -> str:
    """Four pixel points -> ``(x1,y1),(x2,y2),(x3,y3),(x4,y4)`` normalised to [0, 1000)."""
    return ",".join(f"({normalize_coord(x, width)},{normalize_coord(y, height)})" for x, y in quad)


def ref_quad_text(text: str, quad: Quad, width: int, height: int) -> str:
    """``<ref>text</ref><quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>``."""
    return f"<ref>{text}</ref><quad>{quad_text(quad, width, height)}</quad>"


def parse_quads(text: str) -> list[tuple[tuple[int, int], ...]]:
    """All ``<quad>…</quad>`` in ``text`` as four integer points each, in [0, 1000) space."""
    quads = []
    for match in QUAD_PATTERN.finditer(text):
        v = [int(g) for g in match.groups()]
        quads.append(tuple((v[i], v[i + 1]) for i in range(0, 8, 2)))
    return quads
