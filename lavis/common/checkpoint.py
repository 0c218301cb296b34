"""Checkpoint I/O: atomic directory writes, weights as safetensors or sharded, resumable training state.

A checkpoint is a directory ``<output_dir>/checkpoints/step_<n>/`` holding ``meta.json`` (written
last), ``config.yaml`` (the run's config), ``state.pt`` (step, data position, every rank's RNG) and
the weights and optimiser state in one of two layouts:

- full: ``model.safetensors`` and ``optimizer.pt`` (one process, DDP);
- sharded: ``model/`` and ``optimizer/``, ``torch.distributed.checkpoint`` directories in which each
  rank wrote its own shard (FSDP). They load on any number of ranks, under any strategy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

WEIGHTS_NAME = "model.safetensors"
SHARDED_WEIGHTS_NAME = "model"
OPTIMIZER_NAME = "optimizer.pt"
SHARDED_OPTIMIZER_NAME = "optimizer"
STATE_NAME = "state.pt"
META_NAME = "meta.json"
CONFIG_NAME = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: damaged, or not matching this run."""


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a ``torch.distributed.checkpoint`` directory."""
    return (Path(path) / ".metadata").is_file()


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, a sharded directory (gathered into whole tensors), or a
    torch file with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        if not is_sharded(path):
            raise FileNotFoundError(f"{path} is a directory but not a sharded checkpoint (no .metadata)")
        return read_sharded(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def sharded_keys(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The tensors of a sharded directory: name -> (whole shape, dtype), read from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        name: (meta.size, meta.properties.dtype)
        for name, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def read_sharded(path: Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors from a sharded directory, in this process alone (whatever wrote it)."""
    state = {
        name: torch.empty(size, dtype=dtype)
        for name, (size, dtype) in sharded_keys(path).items()
        if keys is None or name in keys
    }
    load_sharded(state, path, alone=True)
    return state


def load_sharded(state: dict[str, Any], path: Path, alone: bool = False) -> None:
    """Fill ``state`` (whole tensors, or this rank's shards) in place from a sharded directory.

    With the ranks of a process group when there is one (they split the reading), else (or with
    ``alone``) in this process only.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    alone = alone or not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=alone)


def weights_path(checkpoint: Path) -> Path:
    """The weights of a checkpoint directory: ``model.safetensors`` or the sharded ``model/``."""
    sharded = Path(checkpoint) / SHARDED_WEIGHTS_NAME
    return sharded if is_sharded(sharded) else Path(checkpoint) / WEIGHTS_NAME


def weight_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint's weights hold: name -> whole shape (no tensor is read)."""
    path = weights_path(checkpoint)
    if path.is_dir():
        return {name: tuple(size) for name, (size, _) in sharded_keys(path).items()}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def weight_names(checkpoint: Path) -> set[str]:
    """Names of the tensors a checkpoint's weights hold (no tensor is read)."""
    return set(weight_shapes(checkpoint))


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_NAME).exists()]
    return [p for _, p in sorted(found)]


def staging_dir(target: Path, owner_pid: int | None = None) -> Path:
    """The temporary directory a checkpoint is written into before :func:`commit` renames it into place."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{owner_pid or os.getpid()}"


def prepare_staging(target: Path, owner_pid: int | None = None) -> Path:
    """Create an empty staging directory for ``target`` (removing a stale one of the same owner)."""
    tmp = staging_dir(target, owner_pid)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, target: Path, meta: dict[str, Any]) -> Path:
    """Write ``meta.json`` last, flush everything to disk and rename ``tmp`` to ``target``.

    A reader never sees a half-written checkpoint: the directory only appears under its final name
    once complete, and an older checkpoint of the same name is replaced in one rename.
    """
    target = Path(target)
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)
    if target.exists():
        stale = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, stale)
        os.rename(tmp, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    return target


def file_checksums(root: Path, share: int = 0, shares: int = 1) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of the files under ``root`` (``meta.json`` excepted):
    share ``share`` of ``shares`` of them (files in sorted order, round-robin), so that several ranks
    can hash one checkpoint together."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != META_NAME)
    return {str(f.relative_to(root)): {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in files[share::shares]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def verify(checkpoint: Path, share: int = 0, shares: int = 1) -> list[str]:
    """Problems of a checkpoint against the checksums its ``meta.json`` records (share ``share`` of
    ``shares`` of its files, as :func:`file_checksums`); [] when it is intact. A checkpoint written
    before checksums were recorded has nothing to verify against and passes."""
    recorded = read_meta(checkpoint).get("files")
    if recorded is None:
        return []
    problems = []
    for name in sorted(recorded)[share::shares]:
        path = Path(checkpoint) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != recorded[name]["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, {recorded[name]['bytes']} written")
        elif _sha256(path) != recorded[name]["sha256"]:
            problems.append(f"{name}: checksum differs")
    return problems


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else ():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META_NAME).read_text())


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary directories)."""
    root = Path(output_dir) / "checkpoints"
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".step_*.tmp-*") if root.is_dir() else ():
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
