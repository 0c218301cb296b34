"""Process-group helpers that are no-ops in a single process (``torchrun`` sets the environment).

Every collective here is guarded: in a plain ``python`` process nothing is initialised and the
helpers return the single-process answer, so the same code runs with and without ``torchrun``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); return this process's device.

    ``device``: ``auto`` picks ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU; the
    backend follows the device (NCCL on CUDA, gloo on the CPU).
    """
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return target


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


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
