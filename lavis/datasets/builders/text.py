"""Text-only builder: plain text from JSONL, supervised whole (Qwen-VL's pure-text data, DESIGN §7).

Each line ``{"text": "red and yellow make orange."}`` becomes ``{"prompt": "", "target": text}``: no
prompt, no leading space, the text as written.
"""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, RecordDataset, as_paths, describe_record, read_annotations


@registry.register("builder", "text")
class TextBuilder:
    """JSONL (or a JSON list) of objects whose ``text_key`` holds the text; one record per line.

    Record id: ``id``, else the line index. A line without a non-blank string under ``text_key``
    fails the build.
    """

    def __init__(self, ann_path: str | list[str], text_key: str = "text") -> None:
        self.ann_paths = as_paths(ann_path)
        self.text_key = text_key

    def build(self) -> RecordDataset:
        records = []
        for path in self.ann_paths:
            for index, record in enumerate(read_annotations(path)):
                where = describe_record(path, index, record)
                text = record.get(self.text_key) if isinstance(record, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise AnnotationError(
                        f"{where}: expected an object with a non-empty string under {self.text_key!r}"
                    )
                records.append({"id": str(record.get("id", index)), "prompt": "", "target": text})
        return RecordDataset(records, "")
