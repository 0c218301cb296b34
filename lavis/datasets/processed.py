"""A dataset of model-ready samples, skipping (and counting) samples that cannot be used."""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch.utils.data import Dataset

from lavis.processors.errors import SkipSample

log = logging.getLogger(__name__)


class ProcessedDataset(Dataset):
    """Applies a sample processor; a sample that raises :class:`SkipSample` is replaced by the next one.

    The replacement is deterministic (the next index), so batches stay full and runs stay
    reproducible; the reasons travel with the sample (``"skipped"``) so the runner can count them
    across workers. ``max_consecutive`` skips in a row fail loudly: the data is broken.
    """

    def __init__(self, records: Dataset, processor: Callable[[dict], dict], max_consecutive: int = 32) -> None:
        if len(records) == 0:
            raise ValueError("the dataset is empty")
        self.records = records
        self.processor = processor
        self.max_consecutive = max_consecutive

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[str] = []
        for attempt in range(self.max_consecutive):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                sample = self.processor(record)
            except SkipSample as err:
                log.debug("skipped sample %s: %s", record.get("id"), err)
                skipped.append(err.reason)
                last_error = f"{record.get('id')}: {err}"
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(
            f"{self.max_consecutive} consecutive samples from index {index} were unusable "
            f"(reasons: {sorted(set(skipped))}); last: {last_error}"
        )
