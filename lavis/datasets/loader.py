"""Data workers whose lives end with the training loop's, however it ends.

A batch stream runs in ``run.num_workers`` DataLoader worker processes. Those processes must not
outlive the trainer: when training stops on an error (in a worker or in the trainer), on an
interrupt, or because the trainer was killed, every worker is gone within seconds, so a failed job
exits instead of holding its allocation until the cluster's wall-clock limit.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WORKER_JOIN_S = 2.0


def worker_batches(
    stream: IterableDataset, num_workers: int, pin_memory: bool, seed: int
) -> Iterator[dict[str, Any]]:
    """The stream's batches, produced by ``num_workers`` worker processes (0: in this process).

    Closing the generator (``close()``, done by the runner whatever way its loop ends) stops the
    workers: the DataLoader's own shutdown first, then SIGKILL for any still alive.
    """
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG, whose state a
        # resume has just restored (dropout after a resume would differ from an uninterrupted run).
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(init_worker, trainer_pid=os.getpid()),
        collate_fn=_as_is,  # the stream's batches are final
    )
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        stop_workers(iterator)


def stop_workers(iterator: Any) -> None:
    """End a DataLoader iterator's worker processes now.

    The DataLoader's shutdown asks them to exit and, failing that, sends SIGTERM, which the workers
    ignore (see :func:`init_worker`); the ones still alive after it are killed.
    """
    workers = list(getattr(iterator, "_workers", []))  # torch's multi-process iterator keeps them there
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(WORKER_JOIN_S)
    if any(worker.is_alive() for worker in workers):
        log.warning("data worker(s) %s did not exit", [w.pid for w in workers if w.is_alive()])


def init_worker(worker_id: int, trainer_pid: int) -> None:
    """Set up one data worker process.

    SIGTERM is ignored: torchrun and cluster schedulers signal every process of the job, and the
    workers must live on until the trainer has saved its checkpoint (the trainer ends them itself).
    The kernel kills the worker when the trainer dies, whatever way it dies (Linux), so that no
    worker outlives a trainer that was killed before it could stop them.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl: DataLoader's watchdog still ends orphans within seconds
            pass
    if os.getppid() != trainer_pid:  # the trainer died before the line above took effect
        os._exit(1)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch
