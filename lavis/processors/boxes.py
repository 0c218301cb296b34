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


BOX_SPAN = re.compile(r"<(box|quad)>(.*?)</\1>", re.S)
POINT = re.compile(r"\((-?\d+),(-?\d+)\)")
POINTS = re.compile(r"\(-?\d+,-?\d+\)(?:,\(-?\d+,-?\d+\))*")


def box_problems(text: str) -> list[str]:
    """What is wrong with the ``<box>``/``<quad>`` spans of a text written by hand or by a converter:
    a span that is not 2 (box) or 4 (quad) integer points, a coordinate outside [0, 1000), or a box
    whose corners are inverted (x2 < x1 or y2 < y1). [] when every span is valid."""
    problems = []
    for match in BOX_SPAN.finditer(text):
        kind, body = match.groups()
        points = [(int(x), int(y)) for x, y in POINT.findall(body)]
        expected = 2 if kind == "box" else 4
        if not POINTS.fullmatch(body) or len(points) != expected:
            problems.append(f"{match.group(0)!r} is not {expected} points (x,y)")
        elif any(not 0 <= v < 1000 for point in points for v in point):
            problems.append(f"{match.group(0)!r} has a coordinate outside [0, 1000)")
        elif kind == "box" and (points[1][0] < points[0][0] or points[1][1] < points[0][1]):
            problems.append(f"{match.group(0)!r} is inverted (its second corner is left of or above the first)")
    return problems


def denorm_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """Normalised [0, 1000) box -> pixel box (inverse of :func:`box_text` up to rounding)."""
    x1, y1, x2, y2 = box
    return x1 * width / 1000, y1 * height / 1000, x2 * width / 1000, y2 * height / 1000


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
