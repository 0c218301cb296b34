"""Output directories that never destroy what a user made: an earlier run's (or evaluation's) files are
continued, refused, or moved aside to ``<dir>.old-<time>`` — never deleted or silently replaced.

Training (``Checkpointer.claim``) and ``evaluate.py`` (:func:`claim`) follow the same rule.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def aside_path(path: str | Path) -> Path:
    """A free ``<path>.old-<YYYYmmdd-HHMMSS>`` beside ``path`` (``-1`` appended while taken)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    return aside


def move_aside(path: str | Path) -> Path:
    """Rename ``path`` to :func:`aside_path` (never deletes anything); returns where it went."""
    aside = aside_path(path)
    Path(path).rename(aside)
    return aside


def claim(path: str | Path, earlier: str | None, overwrite: bool, what: str, ways_out: str) -> str | None:
    """Make ``path`` free for new files. ``earlier``: what of earlier work it holds (None: nothing).
    With ``overwrite`` the earlier work is moved aside (logged); otherwise the refusal message is
    returned (None when the directory may be used): ``what`` names the earlier work, ``ways_out`` the
    ways out other than ``run.overwrite=true``."""
    if earlier is None:
        return None
    if overwrite:
        aside = move_aside(path)
        log.warning("run.overwrite: the earlier %s in %s (%s) was moved to %s", what, path, earlier, aside)
        return None
    return (f"{path} holds an earlier {what} ({earlier}). {ways_out}, or set run.overwrite=true to move the "
            f"earlier {what} aside (to {path}.old-<time>, never deleted)")
