"""Captioning builder: COCO captions JSON, Karpathy's split JSON, or a plain list of image/caption records.

Every record becomes Qwen-VL's stage-2 captioning sample (DESIGN §7)::

    prompt  "<img>{path}</img>Generate the caption in English:"
    target  " {caption}"

This module also holds the small helpers that the other image-text builders share (reading a JSON
object, naming a record, checking a string field, the ``<img>`` tag, split lists).
"""

from __future__ import annotations

from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    SplitFilter,
    as_paths,
    describe_record,
    image_path,
    load_file,
    require_dict,
    require_str,
)
from lavis.processors.conversation import image_reference

CAPTION_PROMPT = "Generate the caption in English:"

# --------------------------------------------------------------------------- captions


def caption_record(rid: str, image: str, caption: str) -> dict[str, str]:
    """A training sample plus the fields evaluation reads (``image`` path, ``caption``)."""
    return {
        "id": rid,
        "prompt": image_reference(image) + CAPTION_PROMPT,
        "target": f" {caption}",
        "image": image,
        "caption": caption,
    }


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
        self.splits = SplitFilter(split)

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
        if self.splits.active:
            raise AnnotationError(
                f"{path}: COCO captions JSON has no splits, but split={self.splits.split!r} is set; "
                "use the file of that split, or Karpathy's split JSON"
            )
        images, annotations = data.get("images"), data.get("annotations")
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise AnnotationError(f"{path}: 'images' and 'annotations' must be lists")
        files = {}
        for index, image in enumerate(images):
            where = f"{path}: images[{index}]"
            require_dict(where, image, "id", "file_name")
            files[image["id"]] = image_path(where, image["file_name"])
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
        records, splits = [], self.splits.reading(path)
        for index, image in enumerate(images):
            where = describe_record(f"{path}: images", index, image, "cocoid", "imgid", "filename")
            require_dict(where, image, "filename", "sentences")
            if not splits.keeps(image.get("split")):
                continue
            filepath = image.get("filepath") or ""
            file = image_path(where, f"{filepath}/{image['filename']}" if filepath else image["filename"])
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
                records.append(caption_record(rid, file, caption))
        splits.check()
        return records

    def _plain(self, path: str, data: list[Any]) -> list[dict[str, str]]:
        records, splits = [], self.splits.reading(path)
        for index, record in enumerate(data):
            where = describe_record(path, index, record)
            require_dict(where, record, "image", "caption")
            if not splits.keeps(record.get("split")):
                continue
            file = image_path(where, record["image"])
            rid = record.get("id", index)
            captions = record["caption"]
            if isinstance(captions, list):
                if not captions:
                    raise AnnotationError(f"{where}: 'caption' is an empty list")
                for k, caption in enumerate(captions):
                    records.append(caption_record(f"{rid}_{k}", file, require_str(where, caption, f"caption {k}")))
            else:
                records.append(caption_record(str(rid), file, require_str(where, captions, "'caption'")))
        splits.check()
        return records
