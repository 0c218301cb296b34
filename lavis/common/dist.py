"""Process-group helpers that are no-ops in a single process (``torchrun`` sets the environment).

Every collective here is guarded: in a plain ``python`` process nothing is initialised and the
helpers return the single-process answer, so the same code runs with and without ``torchrun``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU; ``cuda`` gets the local rank too."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: float = 600.0, always: bool = False) -> torch.device:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); return this process's device.

    The backend follows the device (NCCL on CUDA, gloo on the CPU). A collective that waits longer
    than ``timeout_s`` fails instead of hanging. ``always``: also make a group of one process when
    not launched by ``torchrun`` (strategies that need a process group: DDP, FSDP).
    """
    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    launched = launched_world_size() > 1
    if (launched or always) and not dist.is_initialized():
        options = {"backend": "nccl" if target.type == "cuda" else "gloo", "timeout": timedelta(seconds=timeout_s)}
        if target.type == "cuda":
            options["device_id"] = target
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(**options)
        else:  # one process, no launcher: an in-memory rendezvous
            dist.init_process_group(**options, store=dist.HashStore(), rank=0, world_size=1)
    return target


def launched_world_size() -> int:
    """The number of processes the launcher (``torchrun``) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard_bounds(total: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, end) of shard ``index`` when ``total`` items are split into contiguous, near-equal shards."""
    base, extra = divmod(total, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if any): every process calls it at the end of a run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the body on each node's local rank 0 first, then on the other ranks (who then find its work
    done): e.g. generating files once per node rather than once per rank."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()
