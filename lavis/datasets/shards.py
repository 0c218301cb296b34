"""Writing webdataset tar shards: ``key.png`` + ``key.txt`` per sample, deterministic bytes.

What :mod:`lavis.datasets.builders.webdataset` reads; the synthetic world writes its caption shards
with it (:func:`lavis.datasets.synthetic.world.write_caption_shards`). Imports nothing of lavis.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

# Fixed tar header fields of the shards this module writes, so that equal input gives equal bytes.
_MEMBER_MTIME, _MEMBER_MODE = 0, 0o644


def write_shards(samples: Iterable[tuple[str, bytes, str]], pattern: str, samples_per_shard: int) -> list[str]:
    """Write ``(key, png_bytes, caption)`` samples as ``key.png`` + ``key.txt`` into tar shards.

    ``pattern`` holds a ``%``-format for the shard number, as webdataset's ``ShardWriter``
    (``out/train-%06d.tar``). Deterministic: fixed mtime, owner and mode, members in input order.
    Each shard is written to a temporary name and renamed, so a shard that exists is complete.
    Returns the shard paths written.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    tmp = ""
    count = 0
    try:
        for key, image, caption in samples:
            if tar is None or count == samples_per_shard:
                if tar is not None:
                    tar.close()
                    os.replace(tmp, paths[-1])
                paths.append(pattern % len(paths))
                Path(paths[-1]).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{paths[-1]}.tmp-{os.getpid()}"
                tar = tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT)
                count = 0
            _add_member(tar, f"{key}.png", image)
            _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
            count += 1
        if tar is not None:
            tar.close()
            os.replace(tmp, paths[-1])
            tar = None
    finally:
        if tar is not None:
            tar.close()
            Path(tmp).unlink(missing_ok=True)
    return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime, info.mode = _MEMBER_MTIME, _MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
