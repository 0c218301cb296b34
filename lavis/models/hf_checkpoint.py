"""Reading a transformers checkpoint directory (Qwen2-VL / Qwen2.5-VL) one component at a time: its
weight files (safetensors or ``.bin``, sharded with their index or whole), the tensors a component
wants under the names it gives them, each read only when wanted; and the two tensor layouts of these
checkpoints: the released one (``visual.*``, ``model.*``, ``lm_head.*``) and transformers 5's
(``model.visual.*``, ``model.language_model.*``, ``lm_head.*``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

VISUAL_PREFIXES = ("model.visual.", "visual.")


def checkpoint_files(directory: Path, key: str) -> list[Path]:
    """The weight files of ``directory``; none is a ValueError naming the config ``key`` that gave it."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index).is_file():
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            return [directory / s for s in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise ValueError(f"{key}: no model.safetensors / pytorch_model.bin (or their sharded index) in '{directory}'")


def _tensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, reader) of every tensor of one weights file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, lambda f=f, name=name: f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            yield name, lambda tensor=tensor: tensor


def read_tensors(directory: Path, rename: Callable[[str], str | None], key: str) -> Iterator[tuple[Path, str, str, Any]]:
    """``(file, checkpoint name, our name, reader)`` of each tensor of ``directory`` that ``rename`` maps to a
    name (None: not wanted, never read)."""
    for path in checkpoint_files(directory, key):
        for name, read in _tensors(path):
            ours = rename(name)
            if ours is not None:
                yield path, name, ours, read


def visual_key(key: str, merger: bool) -> str | None:
    """A vision-tower tensor's name inside the visual module (``blocks.0...``; ``merger``: the merger's own
    tensors, named inside the merger, ``ln_q.weight``...), or None for the rest."""
    prefix = next((p for p in VISUAL_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    name = key[len(prefix):]
    is_merger = name.startswith("merger.")
    if merger:
        return name.removeprefix("merger.") if is_merger else None
    return None if is_merger else name


@torch.no_grad()
def load_into(module: torch.nn.Module, directory: Path, rename: Callable[[str], str | None], key: str,
              optional: set[str] = frozenset()) -> None:
    """Copy the tensors of ``directory`` that ``rename`` maps onto ``module``'s parameters and buffers.
    A shape that differs, or a parameter left without a tensor (except ``optional``), is a ValueError
    naming ``key``."""
    targets = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    loaded: set[str] = set()
    for path, name, ours, read in read_tensors(directory, rename, key):
        if ours not in targets:
            continue
        tensor = read()
        if tensor.shape != targets[ours].shape:
            raise ValueError(f"{key}: '{name}' in {path} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(targets[ours].shape)} (does the inline config change a size the checkpoint fixes?)")
        targets[ours].copy_(tensor)
        loaded.add(ours)
    missing = sorted(set(dict(module.named_parameters())) - loaded - set(optional))
    if missing:
        raise ValueError(f"{key}: '{directory}' lacks {len(missing)} of its weights, e.g. {missing[:3]}")
