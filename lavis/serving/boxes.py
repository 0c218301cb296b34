"""Draw the boxes of a Qwen-VL-style response (``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``) on its image."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lavis.processors.boxes import BOX_PATTERN, denorm_box

__all__ = ["PALETTE", "draw_boxes", "find_boxes"]

NormBox = tuple[int, int, int, int]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)

_REF_OR_BOX = re.compile(rf"<ref>(?P<ref>.*?)</ref>|{BOX_PATTERN.pattern}", re.DOTALL)
_LEADING_BARE_BOX = re.compile(r"\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)(?:\s*</box>)?")
_BETWEEN_BOXES_OF_ONE_REF = re.compile(r"[\s,;]*")


def _ordered(box: tuple[int, ...]) -> NormBox:
    x1, y1, x2, y2 = box
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def find_boxes(response: str) -> list[tuple[str | None, NormBox]]:
    """Every box in ``response`` as ``(label, (x1, y1, x2, y2))`` in Qwen-VL's [0, 1000) space, corners ordered.

    A box's label is the text of the ``<ref>`` right before it; boxes that follow one another
    (separated only by spaces or commas) share that ``<ref>``. A box with no ``<ref>`` has label
    ``None``, as has a response starting with a bare ``(x1,y1),(x2,y2)`` (the continuation of a
    prompt ending in ``<box>``).
    """
    found: list[tuple[str | None, NormBox]] = []
    position = 0
    leading = _LEADING_BARE_BOX.match(response)
    if leading is not None:
        found.append((None, _ordered(tuple(int(v) for v in leading.groups()))))
        position = leading.end()

    label: str | None = None
    for match in _REF_OR_BOX.finditer(response, position):
        if match.group("ref") is not None:
            label = match.group("ref").strip() or None
        else:
            if not _BETWEEN_BOXES_OF_ONE_REF.fullmatch(response, position, match.start()):
                label = None
            found.append((label, _ordered(tuple(int(v) for v in match.groups()[1:]))))
        position = match.end()
    return found


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def draw_boxes(
    image: str | Path | Image.Image, response: str, out_path: str | Path | None = None
) -> Image.Image:
    """Draw every box of ``response`` (see :func:`find_boxes`) on an RGB copy of ``image``, labelled.

    Boxes are scaled from [0, 1000) to the image's pixels and outlined in the colours of
    :data:`PALETTE`, in turn; a label is written in a filled tag above the box's top-left
    corner. Saves a PNG at ``out_path`` if given. Returns the drawn image.
    """
    if isinstance(image, Image.Image):
        canvas = image.convert("RGB")
    else:
        with Image.open(image) as opened:
            canvas = opened.convert("RGB")
    width, height = canvas.size
    line_width = max(2, round(max(width, height) / 250))
    font = _font(max(10, round(max(width, height) / 40)))
    draw = ImageDraw.Draw(canvas)

    for index, (label, box) in enumerate(find_boxes(response)):
        colour = PALETTE[index % len(PALETTE)]
        x1, y1, x2, y2 = (round(v) for v in denorm_box(box, width, height))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        padding = line_width
        tag_width, tag_height = right - left + 2 * padding, bottom - top + 2 * padding
        tag_x = max(0, min(x1, width - tag_width))
        tag_y = y1 - tag_height if y1 - tag_height >= 0 else y1
        draw.rectangle((tag_x, tag_y, tag_x + tag_width - 1, tag_y + tag_height - 1), fill=colour)
        draw.text((tag_x + padding - left, tag_y + padding - top), label, fill=_text_colour(colour), font=font)

    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out_path, format="PNG")
    return canvas
