"""A resumable, seeded, rank-aware sampler over an endless sequence of epochs."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields indices of epoch after epoch, each a permutation seeded by ``(seed, epoch)``.

    ``start`` skips that many of this rank's indices, so a resumed run continues exactly where
    the interrupted one stopped. Each rank takes every ``world_size``-th index of the permutation.
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.per_rank = num_samples // world_size
        if self.per_rank == 0:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0
