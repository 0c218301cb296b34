"""Image-caption pairs in webdataset tar shards, read as a stream (Qwen-VL's stage-1 data).

A shard is a plain tar file; consecutive members with the same key (the member name up to the
first dot of its basename, directory kept) form one sample: ``a/b/000123.jpg`` + ``a/b/000123.txt``
-> key ``a/b/000123``. Shards written by ``tar -cf`` (``./`` prefixes, directory entries), by
webdataset's ``TarWriter`` or by :func:`lavis.datasets.shards.write_shards` all read the same way.

Each sample becomes the record::

    {"id": "<shard file name>/<key>",
     "prompt": "<img><key>.<ext></img>Generate the caption in English:",
     "target": " <caption>",
     "image_bytes": {"<key>.<ext>": b"..."}}

and the sample processor loads the image from ``image_bytes`` instead of the disk. A sample the
source cannot use, or a shard that breaks off, is yielded as ``{"skipped": reason, "id": ...}``
so that it is counted (DESIGN §12); one bad shard never stops the run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from braceexpand import braceexpand

from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, StreamingSource
from lavis.processors.conversation import image_reference

log = logging.getLogger(__name__)

CAPTION_PROMPT = "Generate the caption in English:"


def expand_shards(shards: str | list[str]) -> list[str]:
    """Brace-expand one pattern or a list of them: ``s-{000000..000002}.tar`` -> three names."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    return [name for pattern in patterns for name in braceexpand(pattern)]


def split_member_name(name: str) -> tuple[str, str] | None:
    """``./a/b/000123.seg.png`` -> ``("a/b/000123", "seg.png")``; ``None`` for names that are no
    sample part (no extension, or a hidden file such as ``.DS_Store``), as webdataset does."""
    while name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext


class _BrokenTar(Exception):
    """A tar header that is missing, cut or corrupt after the start of the archive."""


class _StrictTarInfo(tarfile.TarInfo):
    """Fails where ``tarfile`` would silently end the archive.

    ``TarFile.next`` treats a missing, cut or corrupt header after the first as the end of the
    archive, so a tar cut at a header boundary would read as complete with no error: silent loss
    of the rest of the shard. A complete tar ends with zero blocks, which still end it quietly.
    """

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as err:  # empty, truncated or invalid header
            raise _BrokenTar(f"{err}: the tar is cut short or corrupt") from None


# What reading a broken or unreadable shard can raise (gzip/zlib errors for compressed shards).
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, _BrokenTar)


class UngroupedShard(AnnotationError):
    """A shard whose members are not grouped by sample key (e.g. written by ``tar -cf x.tar -C dir .``
    without sorting): streamed, its samples would come apart, so it is refused with how to rewrite it."""

    def __init__(self, shard: str, member: str, key: str) -> None:
        super().__init__(
            f"{shard}: member {member} belongs to sample '{key}', whose other members came earlier in the tar "
            f"but not next to it: a sample's files must follow each other (webdataset's layout). Rewrite the "
            f"shard sorted by name, e.g. tar --sort=name -cf {Path(shard).name} -C <dir> ."
        )


class _SampleOrder:
    """Follows the sample keys of a shard's members in order; a key met again after another key means
    the members are not grouped: :class:`UngroupedShard`."""

    def __init__(self, shard: str) -> None:
        self.shard, self.key, self.finished = shard, None, set()

    def is_new(self, member: str, key: str) -> bool:
        """Whether ``member`` (of sample ``key``) starts another sample than the one before it."""
        if key == self.key:
            return False
        if key in self.finished:
            raise UngroupedShard(self.shard, member, key)
        if self.key is not None:
            self.finished.add(self.key)
        self.key = key
        return True


def read_tar_groups(source: str | os.PathLike | BinaryIO, name: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of one tar (a path or an open binary file), streamed, in
    tar order (``tarfile`` in stream mode ``r|*``: plain, gzip, bz2 or xz).

    Directory entries, links and non-sample names are skipped. An extension met twice in a row starts
    a new sample. A key met again after another key means the members are not grouped by sample:
    :class:`UngroupedShard` (``name`` names the shard in it). Raises on a truncated or corrupt tar;
    the sample being read when that happens is not yielded.
    """
    if isinstance(source, (str, os.PathLike)):
        opened = tarfile.open(source, mode="r|*", tarinfo=_StrictTarInfo)
    else:
        opened = tarfile.open(fileobj=source, mode="r|*", tarinfo=_StrictTarInfo)
    with opened as tar:
        order = _SampleOrder(name or str(source))
        key: str | None = None
        parts: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            split = split_member_name(member.name)
            if split is None:
                continue
            member_key, ext = split
            if order.is_new(member.name, member_key) or ext in parts:
                if parts:
                    yield key, parts
                key, parts = member_key, {}
            parts[ext] = tar.extractfile(member).read()
        if parts:
            yield key, parts


def check_grouped(shard: str) -> None:
    """Raise :class:`UngroupedShard` when ``shard``'s members are not grouped by sample key (reads the
    member names only, not their data, for an uncompressed tar). A shard that cannot be read is left
    to the reader, which counts it."""
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return
    order = _SampleOrder(shard)
    for name in names:
        split = split_member_name(name)
        if split is not None:
            order.is_new(name, split[0])


def buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer: fill ``size`` items, then emit a random one and put the next
    item in its place; at the end, the rest in random order. ``size <= 0``: no shuffle."""
    if size <= 0:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


class WebDatasetCaptionSource(StreamingSource):
    """The shards of one caption dataset, split between the data workers (see :meth:`iterate`)."""

    def __init__(
        self,
        shards: list[str],
        shuffle_buffer: int,
        shuffle_shards: bool,
        image_keys: list[str],
        caption_keys: list[str],
        json_caption_field: str,
    ) -> None:
        self.shards = list(shards)
        self.reported: set[str] = set()  # broken shards already warned about (in this process)
        self.complete_sizes: dict[str, int] = {}  # samples in each shard read to its end (in this process)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.image_keys = [k.lower() for k in image_keys]
        self.caption_keys = [k.lower() for k in caption_keys]
        self.json_caption_field = json_caption_field

    def shard_order(self, seed: int, epoch: int) -> list[str]:
        """Every shard, in this epoch's order (the same on every worker)."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{seed}:{epoch}").shuffle(order)
        return order

    def iterate(self, seed: int, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The records of global data worker ``worker`` of ``num_workers`` (ranks x DataLoader
        workers) for one epoch; a pure function of the four arguments.

        With at least as many shards as workers, worker ``w`` reads shards ``w, w+G, ...`` of the
        epoch's shard order; otherwise every worker reads every shard and keeps samples
        ``w, w+G, ...``. Either way each sample is read by exactly one worker per epoch. Caveat:
        in the first case the shares are whole shards, so they differ when the shard count is not
        a multiple of the workers or the shards differ in size (the data workers then go through
        their epochs at different paces: a worker with a smaller share starts its next epoch
        sooner, and its samples are seen somewhat more often); with fewer shards than workers every
        worker reads (and discards most of) all the data.
        """
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} is not one of {num_workers} data workers")
        order = self.shard_order(seed, epoch)
        if len(order) >= num_workers:
            records = self._whole_shards(order[worker::num_workers])
        else:
            records = self._strided(order, worker, num_workers)
        yield from buffer_shuffle(records, self.shuffle_buffer, random.Random(f"{seed}:{epoch}:{worker}"))

    def _whole_shards(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            for item in self._read(shard, report=True):
                yield item if isinstance(item, dict) else self.to_record(shard, *item)

    def _strided(self, shards: list[str], worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        index = 0
        for position, shard in enumerate(shards):
            # A broken shard is read by every worker but reported by one, so it is counted once.
            for item in self._read(shard, report=position % num_workers == worker):
                if isinstance(item, dict):
                    yield item
                    continue
                if index % num_workers == worker:
                    yield self.to_record(shard, *item)
                index += 1

    def _read(self, shard: str, report: bool) -> Iterator[tuple[str, dict[str, bytes]] | dict[str, Any]]:
        """The sample groups of one shard, then ``{"skipped": ...}`` (when ``report``) if it breaks off."""
        count = 0
        opened = False
        try:
            with open(shard, "rb") as fileobj:
                opened = True
                for group in read_tar_groups(fileobj, shard):
                    count += 1
                    yield group
            self.complete_sizes[shard] = count
        except _READ_ERRORS as err:
            reason = "truncated_shard" if opened else "unreadable_shard"
            if report:
                problem = "is truncated or corrupt" if opened else "cannot be opened"
                detail = f"shard {shard} {problem} ({type(err).__name__}: {err}); {count} samples were read from it"
                if self.complete_sizes:  # how many it lost can only be estimated, from its siblings
                    typical = int(statistics.median(self.complete_sizes.values()))
                    detail += f", about {max(typical - count, 0)} lost (the complete shards hold {typical} each)"
                if shard not in self.reported:  # once per shard, not once per epoch
                    self.reported.add(shard)
                    log.warning("%s; going on with the next shard (it is counted as skipped in every epoch)", detail)
                yield {"skipped": reason, "id": Path(shard).name, "detail": detail}

    def to_record(self, shard: str, key: str, parts: dict[str, bytes]) -> dict[str, Any]:
        """One sample group -> the caption record, or ``{"skipped": reason, "id"}``."""
        rid = f"{Path(shard).name}/{key}"
        lowered = {ext.lower(): ext for ext in parts}
        image_ext = next((lowered[k] for k in self.image_keys if k in lowered), None)
        if image_ext is None:
            return {"skipped": "missing_image", "id": rid}
        caption_exts = [lowered[k] for k in self.caption_keys if k in lowered]
        if not caption_exts:
            return {"skipped": "missing_caption", "id": rid}
        caption = next((c for c in (self._caption(ext, parts[ext]) for ext in caption_exts) if c), None)
        if caption is None:
            return {"skipped": "bad_caption", "id": rid}
        path = f"{key}.{image_ext}"
        return {
            "id": rid,
            "prompt": image_reference(path) + CAPTION_PROMPT,
            "target": " " + caption,
            "image_bytes": {path: parts[image_ext]},
        }

    def _caption(self, ext: str, data: bytes) -> str | None:
        """The stripped caption of a ``txt`` or ``json`` member; ``None`` if unusable or empty."""
        try:
            text = data.decode("utf-8")
            if ext.lower().endswith("json"):
                obj = json.loads(text)
                text = obj.get(self.json_caption_field) if isinstance(obj, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(text, str):
            return None
        return text.strip() or None


@registry.register("builder", "webdataset_caption")
class WebDatasetCaptionBuilder:
    """Image-caption pairs in webdataset tar shards (``jpg``/``png``/... + ``txt``/``json`` per sample).

    ``shards``: brace-expanded tar paths (``data/shards/train-{000000..000009}.tar``) or a list of
    them, relative to the current directory. Records are prompt/target pairs with the caption as
    target (Qwen-VL's ``<img>…</img>Generate the caption in English: {caption}``).
    """

    def __init__(
        self,
        shards: str | list[str],
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        # The signature is the config's schema (list-typed keys); the defaults are copied, never mutated.
        image_keys: list[str] = ["jpg", "jpeg", "png", "webp"],  # noqa: B006
        caption_keys: list[str] = ["txt", "json"],  # noqa: B006
        json_caption_field: str = "caption",
    ) -> None:
        self.shards = expand_shards(shards)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.image_keys = list(image_keys)
        self.caption_keys = list(caption_keys)
        self.json_caption_field = json_caption_field

    def build(self) -> WebDatasetCaptionSource:
        """Check that every shard exists now, so a wrong path fails at start."""
        if not self.shards:
            raise AnnotationError("webdataset_caption: 'shards' names no files")
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise AnnotationError(f"{len(missing)} of {len(self.shards)} shard files not found: {shown}")
        if not self.image_keys or not self.caption_keys:
            raise AnnotationError("webdataset_caption: 'image_keys' and 'caption_keys' must not be empty")
        check_grouped(self.shards[0])  # a shard written unsorted fails now rather than in a data worker
        return WebDatasetCaptionSource(
            self.shards,
            self.shuffle_buffer,
            self.shuffle_shards,
            self.image_keys,
            self.caption_keys,
            self.json_caption_field,
        )
