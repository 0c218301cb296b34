"""The data stream: sources -> seeded mixture -> processed samples -> padded or packed batches.

Every data worker (``rank x DataLoader worker``) walks its own share of every source and draws
sources by ``ratio`` from its own seeded sequence, so the whole stream is a pure function of the
seed, the number of ranks and workers, and a small cursor state. Each batch carries the state
reached after it; the runner keeps the state of the last batch it consumed from each worker, and
a resumed run continues exactly where the interrupted one stopped.

A batch holds ``batch_size`` samples (packed: rows), or, with a budget (``batch_tokens``,
``batch_patches``), as many samples as fit it: samples are taken in stream order until the next one
would push the batch over either budget; that sample is held over and opens the next batch. A held-over
sample is never part of the state: the state a batch carries is the one *before* the held-over sample
was drawn, so a stream resumed from it draws that sample again (the processor is a pure function of
the record), and the batches that follow are the same, bit for bit, as without the interruption.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lavis.datasets.builders.base import StreamingSource
from lavis.processors.errors import SkipSample
from lavis.processors.native_image import PatchImages

log = logging.getLogger(__name__)

CHOICE_CHUNK = 4096


@dataclass
class Source:
    """One configured dataset: a map-style dataset of records or a :class:`StreamingSource`."""

    name: str
    data: Dataset | StreamingSource
    ratio: float = 1.0


class SourceCursor:
    """One data worker's endless walk through one source, epoch after epoch.

    Map-style sources: epoch ``e`` is a permutation seeded by ``(seed, source, e)``; worker ``g`` of
    ``G`` takes positions ``g, g+G, ...``. Streaming sources split themselves (``iterate``). The
    state is ``(epoch, offset)``: a map-style cursor seeks to it directly, a streaming one replays.
    """

    def __init__(self, source: Source, index: int, seed: int, worker: int, num_workers: int, state=(0, 0)) -> None:
        self.source = source
        self.seed = seed * 1_000_003 + index
        self.worker, self.num_workers = worker, num_workers
        self.epoch, self.offset = state
        self._order: list[int] | None = None
        self._stream: Iterator[dict] | None = None
        self._seek()

    @property
    def streaming(self) -> bool:
        return isinstance(self.source.data, StreamingSource)

    @property
    def state(self) -> tuple[int, int]:
        return (self.epoch, self.offset)

    def epoch_order(self) -> list[int]:
        """This worker's record indices for the current epoch, in order."""
        n = len(self.source.data)
        gen = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) % 2**64)  # any run.seed numpy accepts
        order = torch.randperm(n, generator=gen)[self.worker :: self.num_workers].tolist()
        if not order:
            raise ValueError(f"dataset '{self.source.name}' has {n} records, fewer than the {self.num_workers} data workers")
        return order

    def _seek(self) -> None:
        if self.streaming:
            self._stream = self.source.data.iterate(self.seed, self.epoch, self.worker, self.num_workers)
            for _ in range(self.offset):
                next(self._stream)
        else:
            self._order = self.epoch_order()

    def next_record(self) -> dict[str, Any]:
        if self.streaming:
            record = next(self._stream, None)
            if record is None:
                if self.offset == 0:
                    raise ValueError(f"dataset '{self.source.name}' gives data worker {self.worker} no records")
                self.epoch, self.offset = self.epoch + 1, 0
                self._seek()
                return self.next_record()
        else:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._seek()
            record = self.source.data[self._order[self.offset]]
        self.offset += 1
        return record


class SourceChooser:
    """Which source draw ``i`` comes from: by ``ratio``, seeded per worker, seekable in O(1)."""

    def __init__(self, ratios: list[float], seed: int, worker: int) -> None:
        self.ratios = ratios
        self.seed, self.worker = seed, worker
        self._chunk, self._choices = -1, []

    def __call__(self, draw: int) -> int:
        if len(self.ratios) == 1:
            return 0
        chunk, pos = divmod(draw, CHOICE_CHUNK)
        if chunk != self._chunk:
            rng = random.Random(f"mixture:{self.seed}:{self.worker}:{chunk}")
            self._chunk = chunk
            self._choices = rng.choices(range(len(self.ratios)), weights=self.ratios, k=CHOICE_CHUNK)
        return self._choices[pos]


class UnusableData(RuntimeError):
    """Too many samples could not be used; ``skip_records`` are the skips that led to it.

    Raised in a data worker, it reaches the trainer inside the stream (a batch holding
    ``data_error``), so that the records survive the trip and end up in ``skipped.jsonl``.
    """

    def __init__(self, message: str, skip_records: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.skip_records = list(skip_records or [])

    def as_batch(self) -> dict[str, Any]:
        return {"data_error": str(self), "skip_records": self.skip_records}

    @classmethod
    def raise_if_error(cls, batch: dict[str, Any]) -> None:
        """Raise the error a worker sent in place of a batch (see :meth:`as_batch`)."""
        if "data_error" in batch:
            raise cls(batch["data_error"], batch["skip_records"])


@dataclass
class Drawn:
    """A processed sample, the skips met while drawing it (``{"dataset", "id", "reason", "detail"}``:
    which record, shard member or shard, and why), and the state before it."""

    sample: dict[str, torch.Tensor]
    skipped: list[dict[str, str]]
    state_before: dict[str, Any]
    source: str = ""


def vision_patches(pixel_values: torch.Tensor | PatchImages | None) -> int:
    """The vision encoder's work in a sample's or a batch's images, in patches: native-resolution images
    (:class:`PatchImages`) count their patches; fixed-size images (a ``[n, 3, H, W]`` tensor, the Qwen-VL
    path, where every image costs the same) count 1 each, so that ``batch_patches`` is an image budget there."""
    if pixel_values is None:
        return 0
    if isinstance(pixel_values, PatchImages):
        return int(pixel_values.patches.shape[0])
    return int(pixel_values.shape[0])


def sample_cost(sample: dict[str, Any]) -> tuple[int, int]:
    """A processed sample's ``(text tokens, vision patches)``, what the batch budgets count."""
    return len(sample["input_ids"]), vision_patches(sample.get("pixel_values"))


@dataclass
class StreamConfig:
    """How the stream batches: ``batch_size`` samples (rows when ``pack``) per batch, unless a budget is set.

    ``batch_tokens``: text tokens per batch, counted as the batch's tensor holds them: padded, rows x the
    longest sample (padding included); packed, it sets the rows (``batch_tokens // max_len`` rows of
    ``max_len``). Null: ``batch_size x max_len``. ``batch_patches``: vision patches per batch (see
    :func:`vision_patches`), across all rows; null: none. With either set, a padded batch is no longer
    ``batch_size`` samples: it takes samples until the next would exceed a budget; a packed batch closes
    its rows also when the next sample's patches would exceed ``batch_patches``. A batch always takes its
    first sample, so a sample over a budget on its own is a batch of its own (never dropped).
    """

    batch_size: int
    max_len: int
    pack: bool
    seed: int
    rank: int = 0
    world_size: int = 1
    max_consecutive_skips: int = 32
    states: dict[int, dict] = field(default_factory=dict)  # per worker identity: where to start
    worker_offset: int = 0  # rotates worker identities so a resumed loader continues the round-robin
    batch_tokens: int | None = None
    batch_patches: int | None = None

    @property
    def budgeted(self) -> bool:
        """Whether batches are cut by budget rather than by ``batch_size``."""
        return self.batch_tokens is not None or self.batch_patches is not None

    @property
    def token_budget(self) -> int:
        """Text tokens per batch: ``batch_tokens``, or ``batch_size x max_len``."""
        return self.batch_tokens if self.batch_tokens is not None else self.batch_size * self.max_len

    @property
    def rows(self) -> int:
        """Rows of a packed batch."""
        return max(1, self.batch_tokens // self.max_len) if self.batch_tokens is not None else self.batch_size


class BatchStream(IterableDataset):
    """Endless batches for a DataLoader (``batch_size=None``), padded or packed.

    ``processor`` turns a record into ``{"input_ids", "labels", "pixel_values"}`` (raising
    :class:`SkipSample` for unusable ones); ``collate`` turns a list of samples (unpacked) or of
    rows of samples (packed) into a batch.
    """

    def __init__(self, sources: list[Source], processor: Callable, collate: Callable, cfg: StreamConfig) -> None:
        if not sources:
            raise ValueError("no datasets to draw from")
        self.sources = sources
        self.processor = processor
        self.collate = collate
        self.cfg = cfg

    def _identity(self) -> tuple[int, int, int]:
        info = get_worker_info()
        local, workers = (info.id, info.num_workers) if info else (0, 1)
        identity = (local + self.cfg.worker_offset) % workers
        return identity, self.cfg.rank * workers + identity, self.cfg.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        identity, worker, num_workers = self._identity()
        state = self.cfg.states.get(identity, {"draws": 0, "cursors": {}})
        walker = _Walker(self, worker, num_workers, state)
        if self.cfg.pack:
            batch_of = walker.packed_batch
        else:
            batch_of = walker.budget_batch if self.cfg.budgeted else walker.padded_batch
        while True:
            try:
                batch = batch_of()
            except UnusableData as err:
                if get_worker_info() is None:
                    raise
                yield err.as_batch()  # from a worker process: the records would not survive a raise
                return
            batch["data_state"] = {"worker": identity, "state": walker.resume_state()}
            yield batch


class _Walker:
    """The mutable part of one worker's stream."""

    def __init__(self, stream: BatchStream, worker: int, num_workers: int, state: dict) -> None:
        self.stream = stream
        self.cfg = stream.cfg
        self.draws = state["draws"]
        self.cursors = [
            SourceCursor(src, i, self.cfg.seed, worker, num_workers, tuple(state["cursors"].get(src.name, (0, 0))))
            for i, src in enumerate(stream.sources)
        ]
        self.choose = SourceChooser([s.ratio for s in stream.sources], self.cfg.seed, worker)
        self.pending: Drawn | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"draws": self.draws, "cursors": {c.source.name: c.state for c in self.cursors}}

    def resume_state(self) -> dict[str, Any]:
        """Where a resumed stream must start: before the sample held over for the next batch."""
        return self.pending.state_before if self.pending else self.snapshot()

    def draw(self) -> Drawn:
        before = self.snapshot()
        cursor = self.cursors[self.choose(self.draws)]
        self.draws += 1
        skipped: list[dict[str, str]] = []
        while True:
            record = cursor.next_record()
            try:
                if "skipped" in record:
                    raise SkipSample(record["skipped"], record.get("detail", ""))
                sample = self.stream.processor(record)
                if self.cfg.pack and len(sample["input_ids"]) > self.cfg.max_len:
                    raise SkipSample("too_long")
                return Drawn(sample, skipped, before, cursor.source.name)
            except SkipSample as err:
                skipped.append(
                    {"dataset": cursor.source.name, "id": str(record.get("id", "?")), "reason": err.reason, "detail": str(err)}
                )
                if len(skipped) >= self.cfg.max_consecutive_skips:
                    raise UnusableData(
                        f"{len(skipped)} consecutive samples of dataset '{cursor.source.name}' were unusable "
                        f"(reasons: {dict(Counter(s['reason'] for s in skipped))}); last: {record.get('id')}: {err}",
                        skipped,
                    ) from None

    def next_item(self) -> Drawn:
        """The held-over sample if there is one, else a new draw."""
        item = self.pending or self.draw()
        self.pending = None
        return item

    def padded_batch(self) -> dict[str, Any]:
        drawn = [self.draw() for _ in range(self.cfg.batch_size)]
        batch = self.stream.collate([d.sample for d in drawn])
        return with_skips(batch, [s for d in drawn for s in d.skipped])

    def budget_batch(self) -> dict[str, Any]:
        """A padded batch by budget: samples in stream order until the next one would take the batch over
        ``token_budget`` (rows x longest sample) or ``batch_patches``; that one is held over for the next batch."""
        drawn: list[Drawn] = []
        longest = patches = 0
        while True:
            item = self.next_item()
            n, p = sample_cost(item.sample)
            if drawn and ((len(drawn) + 1) * max(longest, n) > self.cfg.token_budget or self._over_patches(patches + p)):
                self.pending = item
                break
            drawn.append(item)
            longest, patches = max(longest, n), patches + p
        batch = self.stream.collate([d.sample for d in drawn])
        return with_skips(batch, [s for d in drawn for s in d.skipped])

    def _over_patches(self, patches: int) -> bool:
        return self.cfg.batch_patches is not None and patches > self.cfg.batch_patches

    def packed_batch(self) -> dict[str, Any]:
        """Greedy packing: fill a row until the next sample does not fit, ``rows`` rows; with ``batch_patches``,
        the batch also closes when the next sample's patches would take it over that budget."""
        rows: list[list[Drawn]] = [[]]
        length = patches = 0
        while True:
            item = self.next_item()
            n, p = sample_cost(item.sample)
            if rows[0] and self._over_patches(patches + p):
                self.pending = item
                break
            patches += p
            if length + n <= self.cfg.max_len:
                rows[-1].append(item)
                length += n
            elif len(rows) < self.cfg.rows:
                rows.append([item])
                length = n
            else:
                self.pending = item
                break
        batch = self.stream.collate([[d.sample for d in row] for row in rows])
        return with_skips(batch, [s for row in rows for d in row for s in d.skipped])


def with_skips(batch: dict[str, Any], skips: list[dict[str, str]]) -> dict[str, Any]:
    """``batch`` with the skips met while drawing it: counted by reason (``skipped``, a plain dict:
    DataLoader's conversion and pinning rebuild mappings with ``update()``, which adds Counters up)
    and each one (``skip_records``)."""
    batch["skipped"] = dict(Counter(s["reason"] for s in skips))
    batch["skip_records"] = skips
    return batch
