"""Grounding builders: referring-expression grounding (RefCOCO-style) and grounded captioning.

Boxes on disk are COCO pixel ``[x, y, w, h]``; in text they are Qwen-VL's normalised
``<box>(x1,y1),(x2,y2)</box>`` (see :mod:`lavis.processors.boxes`). Samples (DESIGN §7)::

    ref_grounding     prompt "<img>{path}</img><ref>{expression}</ref>"
                      target "<box>(x1,y1),(x2,y2)</box>"
    grounded_caption  prompt "<img>{path}</img>Generate the caption in English with grounding:"
                      target " a <ref>dog</ref><box>(x1,y1),(x2,y2)</box> on the grass"

On-disk formats (JSON list or JSONL, one object per image region or image)::

    ref_grounding:    {"id"?, "image": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480,
                       "bbox": [x, y, w, h], "sentences": ["the man on the left", ...], "split"?}
                      (a sentence may also be RefCOCO's {"sent": ...}); one record per sentence,
                      id "{id or index}_{k}".
    grounded_caption: {"id"?, "image", "width", "height", "caption": "a dog on the grass",
                       "regions": [{"phrase": "dog", "bbox": [x, y, w, h], "span"?: [start, end]}]}

Converting RefCOCO: each ref of ``refs(unc).p`` joined with its annotation's ``bbox`` and its image's
``file_name``/``width``/``height`` in ``instances.json`` gives one ref_grounding record. Or give
the two files as they are: ``refs_path`` (``refs(unc).p`` as released, read by a restricted unpickler
that builds plain data only and runs no code; or the same list saved as JSON) plus
``instances_path`` and ``split`` ("train", "val", "testA", "testB", ...).

Boxes must lie inside the image. A box that pokes out by at most 1 px (rounding in converters) is
clamped to the image; a box further out, or of zero area, is an unusable record: it is skipped and
counted, and the build logs one WARNING with the count and the first such record (DESIGN §12).
Malformed records (missing keys, a bbox that is not four numbers, ...) fail the build.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    PICKLE_SUFFIXES,
    AnnotationError,
    RecordDataset,
    SkipCounter,
    SplitFilter,
    as_paths,
    describe_record,
    image_path,
    image_tag,
    load_file,
    plain_name,
    read_json,
    read_pickle,
    require_dict,
    require_str,
)
from lavis.processors.boxes import box_text
from lavis.processors.conversation import image_reference

GROUNDED_CAPTION_PROMPT = "Generate the caption in English with grounding:"
EDGE_TOLERANCE = 1.0  # pixels a box may extend past the image edge and still be clamped


class OutsideImage(Exception):
    """A box or quad that does not lie in its image: the record is skipped and counted."""


def numbers(where: str, value: Any, n: int, what: str) -> list[float]:
    """``value`` as a list of ``n`` finite numbers; AnnotationError otherwise."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise AnnotationError(f"{where}: {what} must be {n} numbers, got {value!r}")
    return list(value)


def image_size(where: str, record: dict[str, Any]) -> tuple[int, int]:
    """The record's positive ``width`` and ``height``."""
    size = []
    for key in ("width", "height"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise AnnotationError(f"{where}: '{key}' must be a positive number of pixels, got {value!r}")
        size.append(value)
    return size[0], size[1]


def clamp_point(x: float, y: float, width: float, height: float) -> tuple[float, float]:
    """A pixel point clamped into the image if it is at most EDGE_TOLERANCE outside; else OutsideImage."""
    if not (-EDGE_TOLERANCE <= x <= width + EDGE_TOLERANCE and -EDGE_TOLERANCE <= y <= height + EDGE_TOLERANCE):
        raise OutsideImage(f"point ({x:g}, {y:g}) lies outside the {width:g}x{height:g} image")
    return min(max(x, 0), width), min(max(y, 0), height)


def pixel_box(where: str, bbox: Any, width: float, height: float) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` clamped to the image (see the module notes)."""
    x, y, w, h = numbers(where, bbox, 4, "'bbox' [x, y, w, h]")
    if w <= 0 or h <= 0:
        raise OutsideImage(f"box {bbox!r} has zero area")
    try:
        x1, y1 = clamp_point(x, y, width, height)
        x2, y2 = clamp_point(x + w, y + h, width, height)
    except OutsideImage:
        raise OutsideImage(f"box {bbox!r} (x, y, w, h) lies outside the {width:g}x{height:g} image") from None
    if x2 <= x1 or y2 <= y1:
        raise OutsideImage(f"box {bbox!r} has zero area inside the {width:g}x{height:g} image")
    return x1, y1, x2, y2


def sentences_of(where: str, value: Any) -> list[str]:
    """A non-empty list of expressions: strings or RefCOCO's ``{"sent": ...}`` (or ``{"raw": ...}``)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise AnnotationError(f"{where}: 'sentences' must be a non-empty list")
    out = []
    for k, sentence in enumerate(value):
        if isinstance(sentence, dict):
            sentence = sentence.get("sent", sentence.get("raw"))
        out.append(require_str(where, sentence, f"sentence {k}"))
    return out


def ref_record(
    rid: str, image: str, expression: str, bbox: tuple[float, float, float, float], size: tuple[float, float]
) -> dict[str, Any]:
    """A training sample plus the fields evaluation reads (pixel ``bbox`` x1, y1, x2, y2 and the image size)."""
    return {
        "id": rid,
        "prompt": f"{image_reference(image)}<ref>{expression}</ref>",
        "target": f"<box>{box_text(bbox, *size)}</box>",
        "image": image,
        "expression": expression,
        "bbox": list(bbox),
        "width": size[0],
        "height": size[1],
    }


@registry.register("builder", "ref_grounding")
class RefGroundingBuilder:
    """Referring-expression grounding: one record per expression (see the module notes for formats).

    Give ``ann_path`` (this project's JSON/JSONL), or ``refs_path`` + ``instances_path`` (RefCOCO as
    released, the refs pickle saved as JSON). ``split`` keeps refs (or records with a ``"split"``
    key) of that split; several as ``"testA,testB"``. After ``build()``, ``skipped`` is the number
    of annotation records skipped for a bad box.
    """

    def __init__(
        self,
        ann_path: str | list[str] | None = None,
        image_root: str = "",
        refs_path: str | None = None,
        instances_path: str | None = None,
        split: str | None = None,
    ) -> None:
        refcoco = refs_path is not None or instances_path is not None
        if (ann_path is None) == (not refcoco):
            raise ConfigError("ref_grounding: set either ann_path, or refs_path and instances_path (not both)")
        if refcoco and (refs_path is None or instances_path is None):
            raise ConfigError("ref_grounding: RefCOCO's layout needs both refs_path and instances_path")
        self.ann_paths = as_paths(ann_path) if ann_path is not None else []
        self.refs_path, self.instances_path = refs_path, instances_path
        self.image_root = image_root
        self.splits = SplitFilter(split)
        self.skipped = 0

    def build(self) -> RecordDataset:
        skips, total, records = SkipCounter("box_outside_image"), 0, []
        if self.refs_path is not None:
            total = self._refcoco(records, skips)
        for path in self.ann_paths:
            total += self._plain(path, records, skips)
        skips.warn(type(self).registry_name, total, "whose box lies outside the image or has zero area")
        self.skipped = skips.count
        return RecordDataset(records, self.image_root, skips.entries)

    def _plain(self, path: str, records: list[dict[str, Any]], skips: SkipCounter) -> int:
        data = load_file(path)
        if not isinstance(data, list):
            raise AnnotationError(
                f"{path}: expected a JSON list or JSONL of {{'image', 'width', 'height', 'bbox', 'sentences'}}"
            )
        splits = self.splits.reading(path)
        for index, record in enumerate(data):
            where = describe_record(path, index, record)
            require_dict(where, record, "image", "width", "height", "bbox", "sentences")
            if not splits.keeps(record.get("split")):
                continue
            rid = record.get("id", index)
            self._add(
                records,
                skips,
                where,
                f"{rid}",
                record["image"],
                image_size(where, record),
                record["bbox"],
                record["sentences"],
            )
        splits.check()
        return splits.kept

    def _refcoco(self, records: list[dict[str, Any]], skips: SkipCounter) -> int:
        refs = read_pickle(self.refs_path) if plain_name(self.refs_path).endswith(PICKLE_SUFFIXES) else read_json(self.refs_path)
        if not isinstance(refs, list):
            raise AnnotationError(
                f"{self.refs_path}: expected RefCOCO's refs as a JSON list of {{'ref_id', 'ann_id', 'sentences', ...}}"
            )
        instances = read_json(self.instances_path)
        if (
            not isinstance(instances, dict)
            or not isinstance(instances.get("images"), list)
            or not isinstance(instances.get("annotations"), list)
        ):
            raise AnnotationError(
                f"{self.instances_path}: expected COCO instances JSON with 'images' and 'annotations' lists"
            )
        images, boxes = {}, {}
        for index, image in enumerate(instances["images"]):
            where = describe_record(f"{self.instances_path}: images", index, image)
            require_dict(where, image, "id", "file_name", "width", "height")
            images[image["id"]] = (where, image["file_name"], image_size(where, image))
        for index, ann in enumerate(instances["annotations"]):
            where = describe_record(f"{self.instances_path}: annotations", index, ann)
            require_dict(where, ann, "id", "bbox")
            boxes[ann["id"]] = ann
        splits = self.splits.reading(self.refs_path)
        for index, ref in enumerate(refs):
            where = describe_record(self.refs_path, index, ref, "ref_id")
            require_dict(where, ref, "ann_id", "sentences")
            if not splits.keeps(ref.get("split")):
                continue
            ann = boxes.get(ref["ann_id"])
            if ann is None:
                raise AnnotationError(f"{where}: ann_id {ref['ann_id']!r} is not in {self.instances_path}")
            image_id = ref.get("image_id", ann.get("image_id"))
            if image_id not in images:
                raise AnnotationError(f"{where}: image_id {image_id!r} is not in {self.instances_path}")
            _, file_name, size = images[image_id]
            rid = ref.get("ref_id", index)
            self._add(records, skips, where, f"{rid}", file_name, size, ann["bbox"], ref["sentences"])
        splits.check()
        return splits.kept

    @staticmethod
    def _add(records, skips, where, rid, image, size, bbox, sentences) -> None:
        path = image_path(where, image)
        expressions = sentences_of(where, sentences)
        try:
            box = pixel_box(where, bbox, *size)
        except OutsideImage as err:
            skips.skip(where, str(err))
            return
        for k, expression in enumerate(expressions):
            records.append(ref_record(f"{rid}_{k}", path, expression, box, size))


def _spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def ground_caption(where: str, caption: str, regions: list[tuple[str | None, Any, str]]) -> str:
    """``caption`` with ``<ref>phrase</ref><box>…</box>`` inline for each ``(phrase, span, box)``.

    A region without a ``span`` ([start, end) character offsets) takes the first whole-word
    occurrence of its phrase that no earlier region has claimed; regions naming the same phrase
    (without spans) share one occurrence and give ``<ref>phrase</ref><box>…</box><box>…</box>``, as
    Qwen-VL writes several boxes for one phrase.
    """
    claimed: list[dict[str, Any]] = []  # {"span", "phrase", "boxes", "auto"}
    for j, (phrase, span, box) in enumerate(regions):
        rwhere = f"{where}, region {j}"
        if span is not None:
            start, end = (int(v) for v in numbers(rwhere, span, 2, "'span' [start, end]"))
            if not 0 <= start < end <= len(caption):
                raise AnnotationError(f"{rwhere}: span {span!r} is not inside the caption of {len(caption)} characters")
            if phrase is not None and caption[start:end] != phrase:
                raise AnnotationError(f"{rwhere}: span {span!r} is {caption[start:end]!r}, not the phrase {phrase!r}")
            same = next((c for c in claimed if c["span"] == (start, end)), None)
            if same is not None:
                same["boxes"].append(box)
                continue
            if any(_spans_overlap((start, end), c["span"]) for c in claimed):
                raise AnnotationError(f"{rwhere}: span {span!r} overlaps another region's phrase")
            claimed.append({"span": (start, end), "boxes": [box], "auto": False})
            continue
        phrase = require_str(rwhere, phrase, "'phrase'")
        same = next((c for c in claimed if c["auto"] and caption[slice(*c["span"])] == phrase), None)
        if same is not None:
            same["boxes"].append(box)
            continue
        for match in re.finditer(rf"(?<!\w){re.escape(phrase)}(?!\w)", caption):
            if not any(_spans_overlap(match.span(), c["span"]) for c in claimed):
                claimed.append({"span": match.span(), "boxes": [box], "auto": True})
                break
        else:
            raise AnnotationError(f"{rwhere}: phrase {phrase!r} does not occur (unclaimed) in the caption {caption!r}")
    out, pos = [], 0
    for c in sorted(claimed, key=lambda c: c["span"]):
        start, end = c["span"]
        out.append(
            caption[pos:start] + f"<ref>{caption[start:end]}</ref>" + "".join(f"<box>{b}</box>" for b in c["boxes"])
        )
        pos = end
    return "".join(out) + caption[pos:]


class RegionRecordsBuilder:
    """Shared by builders with one record per image and pixel regions: a record with a region outside
    the image is skipped and counted (``skipped`` after ``build()``, one warning); ``convert``
    returns the record, or ``None`` for such a skip."""

    record_keys = ""  # named in the error for a file that is not a list

    def __init__(self, ann_path: str | list[str], image_root: str = "") -> None:
        self.ann_paths = as_paths(ann_path)
        self.image_root = image_root
        self.skipped = 0

    def build(self) -> RecordDataset:
        skips, total, records = SkipCounter("box_outside_image"), 0, []
        for path in self.ann_paths:
            data = load_file(path)
            if not isinstance(data, list):
                raise AnnotationError(f"{path}: expected a JSON list or JSONL of {{{self.record_keys}}}")
            total += len(data)
            for index, record in enumerate(data):
                record = self.convert(path, index, record, skips)
                if record is not None:
                    records.append(record)
        skips.warn(type(self).registry_name, total, "whose box lies outside the image or has zero area")
        self.skipped = skips.count
        return RecordDataset(records, self.image_root, skips.entries)

    def convert(self, path: str, index: int, record: Any, skips: SkipCounter) -> dict[str, str] | None:
        raise NotImplementedError


@registry.register("builder", "grounded_caption")
class GroundedCaptionBuilder(RegionRecordsBuilder):
    """Grounded captioning: one record per image; each region's phrase gets its box inline.

    Format: JSON list or JSONL of ``{"image", "width", "height", "caption", "regions": [{"phrase",
    "bbox": [x, y, w, h], "span"?: [start, end]}]}`` (see the module notes and
    :func:`ground_caption`). Record id: ``id``, else the index. After ``build()``, ``skipped`` is
    the number of records skipped for a bad box.
    """

    record_keys = "'image', 'caption', 'regions', ..."

    def convert(self, path: str, index: int, record: Any, skips: SkipCounter) -> dict[str, str] | None:
        where = describe_record(path, index, record)
        require_dict(where, record, "image", "width", "height", "caption", "regions")
        tag = image_tag(where, record["image"])
        size = image_size(where, record)
        caption = require_str(where, record["caption"], "'caption'")
        if not isinstance(record["regions"], list):
            raise AnnotationError(f"{where}: 'regions' must be a list")
        regions, outside = [], None
        for j, region in enumerate(record["regions"]):
            rwhere = f"{where}, region {j}"
            require_dict(rwhere, region, "bbox")
            if "phrase" not in region and "span" not in region:
                raise AnnotationError(f"{rwhere}: a region needs a 'phrase' (or a 'span')")
            try:
                box = box_text(pixel_box(rwhere, region["bbox"], *size), *size)
            except OutsideImage as err:
                outside = outside or f"region {j}: {err}"
                box = ""
            regions.append((region.get("phrase"), region.get("span"), box))
        target = ground_caption(where, caption, regions)  # validate phrases even when skipping
        if outside is not None:
            skips.skip(where, outside)
            return None
        return {
            "id": str(record.get("id", index)),
            "prompt": f"{tag}{GROUNDED_CAPTION_PROMPT}",
            "target": f" {target}",
        }
