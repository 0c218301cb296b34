"""What every builder shares: reading annotation files and failing early on bad records."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import pickle
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lavis.processors.conversation import image_reference

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names the file and the record."""


def read_annotations(path: str | Path) -> list[Any]:
    """Records of a JSON list file or a JSONL file (either may be gzip/bzip2/xz-compressed, see
    :func:`read_bytes`); syntax errors and files without a record name the file (and the position)."""
    records = _read_records(Path(path))
    if not records:
        raise AnnotationError(f"{path}: the file holds no records")
    return records


def _read_records(path: Path) -> list[Any]:
    if not is_jsonl(path):
        data = read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    records = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}:{lineno}: malformed JSON line: {err.msg}") from None
    return records


def read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file of any shape; a syntax error names the file and position."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


# Compressed annotation files, recognised by their first bytes (whatever their name): how to read them.
COMPRESSIONS = {b"\x1f\x8b": ("gzip", gzip.decompress), b"BZh": ("bzip2", bz2.decompress),
                b"\xfd7zXZ\x00": ("xz", lzma.decompress)}
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")
# Containers that are not read: named, with the way out.
UNREAD_CONTAINERS = {b"\x28\xb5\x2f\xfd": "zstd-compressed (decompress it, or recompress it with gzip)",
                     b"PK\x03\x04": "a zip archive (unzip it and point the key at the file inside)"}


def plain_name(path: str | Path) -> str:
    """The file name without a compression suffix: ``train.jsonl.gz`` -> ``train.jsonl``."""
    name = Path(path).name
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_jsonl(path: str | Path) -> bool:
    """Whether ``path`` names a JSONL file (``.jsonl``, compressed or not)."""
    return plain_name(path).endswith(".jsonl")


def read_bytes(path: str | Path) -> bytes:
    """The content of an annotation file, decompressed when it is gzip, bzip2 or xz (recognised by its
    first bytes, whatever its name). Every builder reads its files through here: a missing file, a
    broken compressed stream or an archive it cannot read is an AnnotationError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    data = path.read_bytes()
    for magic, (kind, decompress) in COMPRESSIONS.items():
        if data.startswith(magic):
            try:
                return decompress(data)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
                raise AnnotationError(f"{path}: a {kind} file that cannot be decompressed ({err}); "
                                      "is it complete? (re-download or re-compress it)") from None
    for magic, what in UNREAD_CONTAINERS.items():
        if data.startswith(magic):
            raise AnnotationError(f"{path}: {what}; annotation files are read as they are or gzip/bzip2/xz-compressed")
    return data


def read_text(path: str | Path) -> str:
    """The UTF-8 text of an annotation file (JSON, JSONL, TSV), compressed or not (see :func:`read_bytes`);
    text that is not UTF-8 is an AnnotationError naming the file and the byte."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AnnotationError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); annotation files are UTF-8 JSON, JSONL or "
            "TSV, as they are or gzip/bzip2/xz-compressed (re-encode it as UTF-8)"
        ) from None


PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes make (lists, dicts, tuples, strings, numbers, ...):
    a pickle that names any class or function is refused before anything of it runs."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}")


def read_pickle(path: str | Path) -> Any:
    """A pickle of plain data, as released datasets ship them (RefCOCO's ``refs(unc).p``, written by
    Python 2: its byte strings are read as UTF-8, or Latin-1 where they are not UTF-8). No code runs:
    a pickle that asks for a class or function is an :class:`AnnotationError` naming it."""
    path = Path(path)
    data = read_bytes(path)
    for encoding in ("utf-8", "latin-1"):
        try:
            return _PlainUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except pickle.UnpicklingError as err:
            raise AnnotationError(
                f"{path}: refused: {err}; only plain data (lists, dicts, strings, numbers) is read from pickles, "
                "so that no code in a data file runs"
            ) from None
        except (EOFError, ValueError, IndexError, KeyError, TypeError) as err:
            raise AnnotationError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    raise AssertionError("unreachable: latin-1 decodes any bytes")


def load_file(path: str | Path) -> Any:
    """A ``.jsonl`` file (or ``.jsonl.gz``, ...) as a list of records, any other file as parsed JSON (a list
    or an object)."""
    return read_annotations(path) if is_jsonl(path) else read_json(path)


class ReleasedBenchmark:
    """Base of the builders that read a benchmark's files as its authors release them; ``released_at``
    says where, and a missing file names it."""

    released_at: str = ""

    def require_release(self, path: str | Path) -> None:
        """AnnotationError naming ``path`` and where the benchmark is published, if it does not exist."""
        if not Path(path).exists():
            raise AnnotationError(f"annotation file not found: {path} ({self.registry_name}: released at {self.released_at})")


def keyed_entries(path: str | Path, data: Any, what: str, *keys: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(id, where, entry)`` for each entry of a released JSON object keyed by id (``{id: {...}}``, as
    GQA, OCR-VQA and ScienceQA ship), each checked to hold ``keys``; another shape is an error naming
    the file and ``what`` it should be."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: not {what}: expected {{id: {{{', '.join(map(repr, keys))}, ...}}}}")
    for key, entry in data.items():
        where = f"{path}: {key}"
        yield str(key), where, require_dict(where, entry, *keys)


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


def image_path(where: str, path: Any) -> str:
    """A relative (or absolute) image path fit for an ``<img>`` tag; the file itself is not checked."""
    path = require_str(where, path, "the image path")
    if "<" in path or ">" in path or "\n" in path:
        raise AnnotationError(f"{where}: image path {path!r} contains '<', '>' or a newline")
    return path


def image_tag(where: str, path: Any) -> str:
    """``<img>{path}</img>`` for a checked :func:`image_path`."""
    return image_reference(image_path(where, path))


def parse_splits(split: str | None) -> tuple[str, ...] | None:
    """``"train,restval"`` (or ``"train+restval"``) -> ``("train", "restval")``; ``None`` keeps all."""
    if split is None:
        return None
    names = tuple(s.strip() for s in split.replace("+", ",").split(",") if s.strip())
    if not names:
        raise ValueError(f"split {split!r} names no split")
    return names


class SplitFilter:
    """The split(s) a builder keeps: ``split="train,restval"`` (or ``"train+restval"``); None keeps all.

    Records are filtered file by file (:meth:`reading`), so that a file of which nothing is kept is
    an error naming the splits it holds: a typo would otherwise train on nothing.
    """

    def __init__(self, split: str | None) -> None:
        self.split = split
        self.names = parse_splits(split)

    @property
    def active(self) -> bool:
        return self.names is not None

    def reading(self, path: str | Path) -> FileSplits:
        return FileSplits(str(path), self.names)


class FileSplits:
    """One annotation file's records under a :class:`SplitFilter`."""

    def __init__(self, path: str, names: tuple[str, ...] | None) -> None:
        self.path, self.names = path, names
        self.present: set[Any] = set()
        self.kept = 0

    def keeps(self, split: Any) -> bool:
        """Whether a record of ``split`` (its ``split`` field) is kept."""
        self.present.add(split)
        kept = self.names is None or split in self.names
        self.kept += kept
        return kept

    def check(self) -> None:
        """Fail when the filter kept nothing from the file."""
        if self.names is not None and self.kept == 0:
            found = ", ".join(sorted(map(str, self.present))) or "none (no 'split' keys)"
            raise AnnotationError(f"{self.path}: no records of split {', '.join(self.names)}; splits in the file: {found}")


class SkipCounter:
    """The records a builder skipped at build time, under one ``reason``: each is kept (for
    ``skipped.jsonl``) and one WARNING per build names the first."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.entries: list[dict[str, str]] = []

    @property
    def count(self) -> int:
        return len(self.entries)

    def skip(self, where: str, detail: str) -> None:
        self.entries.append({"id": where, "reason": self.reason, "detail": detail})

    def warn(self, builder: str, total: int, what: str) -> None:
        """One WARNING: ``{builder}: skipped {n} of {total} annotation records {what} (first: ...)``."""
        if self.entries:
            first = self.entries[0]
            log.warning(
                "%s: skipped %d of %d annotation records %s (first: %s: %s)",
                builder, self.count, total, what, first["id"], first["detail"],
            )


class RecordDataset(Dataset):
    """Parsed records in memory; each item is the record plus its dataset's ``image_root``."""

    def __init__(self, records: list[dict[str, Any]], image_root: str, skipped: list[dict[str, str]] | None = None) -> None:
        self.records = records
        self.image_root = image_root
        self.skipped = skipped or []  # records the builder could not use (SkipCounter entries)

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
