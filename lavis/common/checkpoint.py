"""Checkpoint I/O: atomic directory writes, safetensors weights, resumable training state."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "state.pt"
META_NAME = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch file with ``weights_only=True``."""
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_NAME).exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    target: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write weights + state + meta into a temporary directory, then rename it into place.

    A reader never sees a half-written checkpoint: ``meta.json`` is written last and the
    directory only appears under its final name once complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_NAME))
    torch.save(state, tmp / STATE_NAME)
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if target.exists():
        stale = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, stale)
        os.rename(tmp, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    return target


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


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, state, meta) of a checkpoint directory."""
    path = Path(path)
    weights = load_file(str(path / WEIGHTS_NAME))
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    meta = json.loads((path / META_NAME).read_text())
    return weights, state, meta


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
