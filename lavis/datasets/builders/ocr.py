"""OCR builder: images with text regions, as Qwen-VL's "OCR with grounding" task (DESIGN §6, §7)::

    prompt  "<img>{path}</img>OCR with grounding:"
    target  " <ref>{text}</ref><quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad><ref>…</ref><quad>…</quad>"

Format: a JSON list or JSONL of::

    {"id"?, "image": "page_001.png", "width": 800, "height": 600,
     "ocr": [{"text": "STOP", "quad": [[x1, y1], [x2, y2], [x3, y3], [x4, y4]]},
             {"text": "42", "bbox": [x, y, w, h]}]}

Pixel coordinates; a quad's points in reading order (clockwise from the top left), also accepted
flat as ``[x1, y1, ..., x4, y4]``; a bbox is COCO ``[x, y, w, h]``. Regions keep their order. As for
boxes (see :mod:`lavis.datasets.builders.grounding`), a region at most 1 px past the edge is clamped
and a record with a region further out, or of zero area, is skipped, counted and reported in one
WARNING at build; a malformed record fails the build.
"""

from __future__ import annotations

from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    SkipCounter,
    describe_record,
    image_tag,
    require_dict,
    require_str,
)
from lavis.datasets.builders.grounding import (
    OutsideImage,
    RegionRecordsBuilder,
    clamp_point,
    image_size,
    numbers,
    pixel_box,
)
from lavis.processors.quads import Quad, box_to_quad, ref_quad_text

OCR_PROMPT = "OCR with grounding:"


def _area(quad: Quad) -> float:
    """Shoelace area of a quad (absolute)."""
    return abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(quad, quad[1:] + quad[:1]))) / 2


def pixel_quad(where: str, region: dict[str, Any], width: float, height: float) -> Quad:
    """A region's quad (or bbox) in pixels, clamped to the image; OutsideImage when unusable."""
    if "quad" in region:
        value = region["quad"]
        if isinstance(value, list) and len(value) == 4 and all(isinstance(p, (list, tuple)) for p in value):
            points = [numbers(where, p, 2, "each 'quad' point [x, y]") for p in value]
        else:
            flat = numbers(where, value, 8, "'quad' [[x1, y1], ..., [x4, y4]] (or 8 numbers)")
            points = [flat[i : i + 2] for i in range(0, 8, 2)]
        try:
            quad = tuple(clamp_point(x, y, width, height) for x, y in points)
        except OutsideImage as err:
            raise OutsideImage(f"quad {value!r}: {err}") from None
        if _area(quad) <= 0:
            raise OutsideImage(f"quad {value!r} has zero area")
        return quad
    if "bbox" in region:
        return box_to_quad(pixel_box(where, region["bbox"], width, height))
    raise AnnotationError(f"{where}: a text region needs a 'quad' or a 'bbox'")


@registry.register("builder", "ocr")
class OCRBuilder(RegionRecordsBuilder):
    """Text reading with grounding: one record per image (see the module notes for the format).

    Record id: ``id``, else the index. After ``build()``, ``skipped`` is the number of records
    skipped for a region outside the image.
    """

    record_keys = "'image', 'width', 'height', 'ocr'"

    def convert(self, path: str, index: int, record: Any, skips: SkipCounter) -> dict[str, str] | None:
        where = describe_record(path, index, record)
        require_dict(where, record, "image", "width", "height", "ocr")
        tag = image_tag(where, record["image"])
        width, height = image_size(where, record)
        regions = record["ocr"]
        if not isinstance(regions, list) or not regions:
            raise AnnotationError(f"{where}: 'ocr' must be a non-empty list of text regions")
        parts, outside = [], None
        for j, region in enumerate(regions):
            rwhere = f"{where}, region {j}"
            require_dict(rwhere, region, "text")
            text = require_str(rwhere, region["text"], "'text'")
            try:
                parts.append(ref_quad_text(text, pixel_quad(rwhere, region, width, height), width, height))
            except OutsideImage as err:
                outside = outside or f"region {j}: {err}"
        if outside is not None:
            skips.skip(where, outside)
            return None
        return {"id": str(record.get("id", index)), "prompt": f"{tag}{OCR_PROMPT}", "target": " " + "".join(parts)}
