"""Logging set-up and the metrics file."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lavis.tracking.loggers import Logger

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class JsonlLog:
    """Appends one JSON object per line and flushes, so a killed run keeps its log.

    ``resume_step``: continue a log from that step; records of later steps (written by the run
    that was interrupted after its last checkpoint) are dropped, so no step appears twice.
    ``None`` starts a new log.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        # Appending: other processes of the run may add lines too (see append_records).
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class MetricsWriter(JsonlLog):
    """``metrics.jsonl``; the experiment ``loggers`` (:mod:`lavis.tracking.loggers`) also get the numeric
    values of every record, and each evaluation's table and samples through :meth:`log_evaluation`."""

    def __init__(self, path: str | Path, resume_step: int | None = None, loggers: Sequence[Logger] = ()) -> None:
        self.loggers = list(loggers)
        super().__init__(path, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        for logger in self.loggers:
            logger.log_metrics(numbers, step=record["step"])

    def log_evaluation(self, rows: list[dict[str, Any]], samples: dict[str, list[dict[str, Any]]], step: int) -> None:
        """An evaluation's results table and sample predictions, to the loggers (see :class:`Logger`)."""
        for logger in self.loggers:
            logger.log_evaluation(rows, samples, step)

    def close(self) -> None:
        super().close()
        for logger in self.loggers:
            logger.finish()


class SkipLog(JsonlLog):
    """``skipped.jsonl``: one line per unusable sample (step, rank, dataset, record id or shard member,
    reason, detail; step 0: records the builders dropped at start); the first few of each reason
    met during training are also logged, so a skip is never only a count."""

    SHOWN_PER_REASON = 3

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        super().__init__(path, resume_step)
        self.shown: Counter = Counter()

    def add(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.write(record)
            reason = record["reason"]
            self.shown[reason] += 1
            if self.shown[reason] <= self.SHOWN_PER_REASON:
                more = f"; further '{reason}' skips only in {self.path}" if self.shown[reason] == self.SHOWN_PER_REASON else ""
                log.warning(
                    "skipped %s of dataset %s (%s): %s%s", record["id"], record["dataset"], reason, record["detail"], more
                )


def append_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to a JSON-lines log that another process may be writing too (one write per line)."""
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


class NullMetricsWriter:
    """What ranks other than the main one log to: nothing (rank 0 writes the run's metrics)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def log_evaluation(self, rows: list[dict[str, Any]], samples: dict[str, list[dict[str, Any]]], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
