"""``train.py`` that SIGKILLs itself half-way through writing one checkpoint (a test helper).

Environment: ``KILL_DURING_SAVE`` names the checkpoint (e.g. ``step_00000006``); ``KILL_RANK`` the
rank that dies (default 0). The dying rank writes the checkpoint's weights, cuts the file (or the
last shard file) in half and kills itself before anything else of that checkpoint is written, as a
power cut or an OOM kill would. Every other argument goes to ``train.py`` unchanged.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import torch.distributed.checkpoint as dcp

from lavis.runners import checkpointer

REPO = Path(__file__).resolve().parents[1]
TARGET = os.environ["KILL_DURING_SAVE"]
RANK = int(os.environ.get("KILL_RANK", "0"))


def _die_if_target(path: str) -> None:
    if f".{TARGET}.tmp-" not in path or int(os.environ.get("RANK", "0")) != RANK:
        return
    files = sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]
    last = [f for f in files if f.is_file()][-1]
    with open(last, "r+b") as fh:
        fh.truncate(last.stat().st_size // 2)
    print(f"killed while writing {path}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _save_file(tensors, filename, *args, **kwargs):
    _real_save_file(tensors, filename, *args, **kwargs)
    _die_if_target(str(filename))


def _dcp_save(state, *args, checkpoint_id=None, **kwargs):
    result = _real_dcp_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)
    _die_if_target(str(checkpoint_id))
    return result


_real_save_file, checkpointer.save_file = checkpointer.save_file, _save_file
_real_dcp_save, dcp.save = dcp.save, _dcp_save

sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
runpy.run_path(str(REPO / "train.py"), run_name="__main__")
