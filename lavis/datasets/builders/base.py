"""What every builder shares: reading annotation files and failing early on bad records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names the file and the record."""


def read_annotations(path: str | Path) -> list[Any]:
    """Records of a JSON list file or a JSONL file; syntax errors name the file and position."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise AnnotationError(f"{path}:{lineno}: malformed JSON line: {err.msg}") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def record_name(path: str | Path, index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record {index}" + (f" (id {rid!r})" if rid is not None else "")


class RecordDataset(Dataset):
    """Parsed records in memory; each item is the record plus its dataset's ``image_root``."""

    def __init__(self, records: list[dict[str, Any]], image_root: str) -> None:
        self.records = records
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.records[index], "image_root": self.image_root}


def as_paths(ann_path: str | list[str]) -> list[str]:
    return [ann_path] if isinstance(ann_path, str) else list(ann_path)


class StreamingSource:
    """A dataset read as a stream (e.g. tar shards), split between data workers.

    ``iterate`` yields the records of one data worker's share of one epoch, in a deterministic
    order for ``(seed, epoch, worker, num_workers)``. A record the source could not use is yielded
    as ``{"skipped": reason}`` so that it is counted, never silently lost.
    """

    def iterate(self, seed: int, epoch: int, worker: int, num_workers: int):
        raise NotImplementedError
