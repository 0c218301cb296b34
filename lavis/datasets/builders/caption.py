"""Captioning builder: COCO captions JSON, Karpathy's split JSON, or a plain list of image/caption records.

Every record becomes Qwen-VL's stage-2 captioning sample (DESIGN §7)::

    prompt  "<img>{path}</img>Generate the caption in English:"
    target  " {caption}"

This module also holds the small helpers that the other image-text builders share (reading a JSON
object, naming a record, checking a string field, the ``<img>`` tag, split lists).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, RecordDataset, as_paths, read_annotations

CAPTION_PROMPT = "Generate the caption in English:"

# --------------------------------------------------------------------------- shared helpers


def read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file of any shape; a syntax error names the file and position."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def load_file(path: str | Path) -> Any:
    """A ``.jsonl`` file as a list of records, any other file as parsed JSON (a list or an object)."""
    return read_annotations(path) if str(path).endswith(".jsonl") else read_json(path)


def describe_record(path: str | Path, index: int, record: Any, *keys: str) -> str:
    """``"{path}: record {index} (id 7)"``: the first of ``keys`` (default ``id``) the record has."""
    for key in keys or ("id",):
        if isinstance(record, dict) and record.get(key) is not None:
            return f"{path}: record {index} ({key} {record[key]!r})"
    return f"{path}: record {index}"


def require_dict(where: str, record: Any, *keys: str) -> dict[str, Any]:
    """``record`` if it is an object holding every one of ``keys``; AnnotationError otherwise."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise AnnotationError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    return record


def require_str(where: str, value: Any, what: str) -> str:
    """``value`` stripped, if it is a non-blank string; AnnotationError naming ``what`` otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value.strip()


def image_tag(where: str, path: Any) -> str:
    """``<img>{path}</img>`` for a relative (or absolute) image path; the path itself is not checked."""
    path = require_str(where, path, "the image path")
    if "<" in path or ">" in path or "\n" in path:
        raise AnnotationError(f"{where}: image path {path!r} contains '<', '>' or a newline")
    return f"<img>{path}</img>"


def parse_splits(split: str | None) -> tuple[str, ...] | None:
    """``"train,restval"`` (or ``"train+restval"``) -> ``("train", "restval")``; ``None`` keeps all."""
    if split is None:
        return None
    names = tuple(s.strip() for s in split.replace("+", ",").split(",") if s.strip())
    if not names:
        raise ValueError(f"split {split!r} names no split")
    return names


def check_split_kept(path: str, splits: tuple[str, ...] | None, kept: int, present: set[Any]) -> None:
    """Fail when a split filter kept nothing from a file (a typo would otherwise train on nothing)."""
    if splits is not None and kept == 0:
        found = ", ".join(sorted(map(str, present))) or "none (no 'split' keys)"
        raise AnnotationError(f"{path}: no records of split {', '.join(splits)}; splits in the file: {found}")


# --------------------------------------------------------------------------- captions


def caption_record(rid: str, image: str, caption: str) -> dict[str, str]:
    return {"id": rid, "prompt": f"{image}{CAPTION_PROMPT}", "target": f" {caption}"}


@registry.register("builder", "coco_caption")
class CocoCaptionBuilder:
    """Image captions, one record per caption. Each file of ``ann_path`` may be any of:

    * COCO's captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id",
      "caption"}]}`` (e.g. ``captions_train2014.json``; ``image_root`` is then ``train2014/``);
    * Karpathy's split JSON (``dataset_coco.json``): ``{"images": [{"filepath", "filename", "split",
      "sentences": [{"raw"}]}]}``; the image path is ``filepath/filename``;
    * a JSON list or JSONL of ``{"image": path, "caption": str | [str]}`` (LAVIS's
      ``coco_karpathy_*.json``), optionally with ``"id"`` and ``"split"``.

    ``split`` keeps only images (Karpathy) or records (list format) of that split; several may be
    given as ``"train,restval"``. It is an error for COCO's captions JSON (which has no splits) and
    when it keeps nothing. Captions are stripped of surrounding whitespace. Record ids: COCO's
    annotation id, Karpathy's ``sentid``, otherwise ``{id or index}_{k}`` (``{id or index}`` for a
    single caption string).
    """

    def __init__(self, ann_path: str | list[str], image_root: str = "", split: str | None = None) -> None:
        self.ann_paths = as_paths(ann_path)
        self.image_root = image_root
        self.split = split
        self.splits = parse_splits(split)

    def build(self) -> RecordDataset:
        records: list[dict[str, str]] = []
        for path in self.ann_paths:
            data = load_file(path)
            if isinstance(data, dict) and "annotations" in data:
                records += self._coco(path, data)
            elif isinstance(data, dict) and "images" in data:
                records += self._karpathy(path, data)
            elif isinstance(data, list):
                records += self._plain(path, data)
            else:
                raise AnnotationError(
                    f"{path}: not a caption file: expected COCO captions ({{'images', 'annotations'}}), "
                    "Karpathy's split JSON ({'images': [{'sentences', ...}]}) or a list of {'image', 'caption'}"
                )
        return RecordDataset(records, self.image_root)

    def _coco(self, path: str, data: dict[str, Any]) -> list[dict[str, str]]:
        if self.splits is not None:
            raise AnnotationError(
                f"{path}: COCO captions JSON has no splits, but split={self.split!r} is set; "
                "use the file of that split, or Karpathy's split JSON"
            )
        images, annotations = data.get("images"), data.get("annotations")
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise AnnotationError(f"{path}: 'images' and 'annotations' must be lists")
        files = {}
        for index, image in enumerate(images):
            where = f"{path}: images[{index}]"
            require_dict(where, image, "id", "file_name")
            files[image["id"]] = image_tag(where, image["file_name"])
        records = []
        for index, ann in enumerate(annotations):
            where = describe_record(f"{path}: annotations", index, ann)
            require_dict(where, ann, "image_id", "caption")
            if ann["image_id"] not in files:
                raise AnnotationError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
            caption = require_str(where, ann["caption"], "'caption'")
            rid = str(ann["id"]) if ann.get("id") is not None else f"{ann['image_id']}_{index}"
            records.append(caption_record(rid, files[ann["image_id"]], caption))
        return records

    def _karpathy(self, path: str, data: dict[str, Any]) -> list[dict[str, str]]:
        images = data["images"]
        if not isinstance(images, list):
            raise AnnotationError(f"{path}: 'images' must be a list")
        records, present = [], set()
        for index, image in enumerate(images):
            where = describe_record(f"{path}: images", index, image, "cocoid", "imgid", "filename")
            require_dict(where, image, "filename", "sentences")
            present.add(image.get("split"))
            if self.splits is not None and image.get("split") not in self.splits:
                continue
            filepath = image.get("filepath") or ""
            tag = image_tag(where, f"{filepath}/{image['filename']}" if filepath else image["filename"])
            sentences = image["sentences"]
            if not isinstance(sentences, list) or not sentences:
                raise AnnotationError(f"{where}: 'sentences' must be a non-empty list")
            image_id = image.get("cocoid", image.get("imgid", index))
            for k, sentence in enumerate(sentences):
                swhere = f"{where}, sentence {k}"
                if not isinstance(sentence, dict):
                    raise AnnotationError(f"{swhere}: expected an object with 'raw'")
                raw = sentence.get("raw")
                if raw is None and isinstance(sentence.get("tokens"), list):
                    raw = " ".join(map(str, sentence["tokens"]))
                caption = require_str(swhere, raw, "'raw'")
                rid = str(sentence["sentid"]) if sentence.get("sentid") is not None else f"{image_id}_{k}"
                records.append(caption_record(rid, tag, caption))
        check_split_kept(path, self.splits, len(records), present)
        return records

    def _plain(self, path: str, data: list[Any]) -> list[dict[str, str]]:
        records, present = [], set()
        for index, record in enumerate(data):
            where = describe_record(path, index, record)
            require_dict(where, record, "image", "caption")
            present.add(record.get("split"))
            if self.splits is not None and record.get("split") not in self.splits:
                continue
            tag = image_tag(where, record["image"])
            rid = record.get("id", index)
            captions = record["caption"]
            if isinstance(captions, list):
                if not captions:
                    raise AnnotationError(f"{where}: 'caption' is an empty list")
                for k, caption in enumerate(captions):
                    records.append(caption_record(f"{rid}_{k}", tag, require_str(where, caption, f"caption {k}")))
            else:
                records.append(caption_record(str(rid), tag, require_str(where, captions, "'caption'")))
        check_split_kept(path, self.splits, len(records), present)
        return records
