"""Writing OUT without losing anything (``lavis.export``, ``lavis.convert``): OUT is new or empty, never
an input, a directory above or inside one, or a training run's; it is written in a staging directory
beside it and appears only once complete, an earlier OUT moved aside (``--overwrite``), never deleted."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lavis.common import checkpoint as ckpt
from lavis.common.output_dir import move_aside

log = logging.getLogger("lavis.export")  # the name its messages have always carried


class OutputRefused(ValueError):
    """An output directory this command may not write into (it would replace what is not its own)."""


def is_run_dir(path: Path) -> bool:
    """A training run's ``output_dir``: its ``config.yaml`` beside ``checkpoints/``."""
    return (path / ckpt.CONFIG_NAME).is_file() and (path / "checkpoints").is_dir()


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(out: str | Path, inputs: Iterable[tuple[Path, bool]], overwrite: bool,
                 error: type[ValueError] = OutputRefused) -> Path:
    """``out`` made absolute, once it is certain that writing there replaces nothing of anyone else's.

    ``inputs``: ``(path, whole)`` for what the command reads: OUT may be neither one of them nor a
    directory above one, nor, where ``whole`` (a model or run directory), a directory inside one.
    A training run's directory, or one inside a run, is refused too; a file is not a directory; a
    directory that holds anything is refused unless ``overwrite`` (it is then moved aside by
    :func:`staged_output`). Raises ``error`` naming OUT and the way out.
    """
    out = Path(os.path.abspath(out))
    refuse = f"refusing to write into {out}"
    for path, whole in inputs:
        path = Path(os.path.abspath(path))
        for there in {path, path.resolve()}:
            target = {out, out.resolve() if out.exists() else out}
            if any(_within(there, o) for o in target):
                what = "is" if there in target else "holds"
                raise error(f"{refuse}: it {what} the input {path}; write the output elsewhere")
            if whole and any(_within(o, there) for o in target):
                raise error(f"{refuse}: it is inside the input {path}; write the output elsewhere")
    if _within(Path.cwd(), out):
        raise error(f"{refuse}: it holds the current directory; write the output elsewhere")
    for candidate in (out, *out.parents):
        if is_run_dir(candidate):
            where = "is" if candidate == out else f"is inside {candidate},"
            raise error(f"{refuse}: it {where} a training run's output directory (config.yaml and checkpoints/), "
                        "whatever --overwrite says; write the output elsewhere")
    if out.exists() and not out.is_dir():
        raise error(f"{refuse}: it is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(f"{out} is not empty: write the output elsewhere, or pass --overwrite (overwrite=True) to move "
                    f"what it holds aside to {out.name}.old-<time> first")
    return out


@contextmanager
def staged_output(out: str | Path, inputs: Iterable[tuple[Path, bool]], overwrite: bool,
                  error: type[ValueError] = OutputRefused) -> Iterator[Path]:
    """Write into a staging directory beside ``out`` (yielded) that becomes ``out`` once complete.

    ``out`` is checked first (:func:`check_output`) and again before the rename; an earlier
    non-empty ``out`` is then moved aside (``overwrite``), never deleted. On an error the staging
    directory is removed and ``out`` is left as it was.
    """
    inputs = list(inputs)
    out = check_output(out, inputs, overwrite, error)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # this process's own leftover, if any
    staging.mkdir()
    try:
        yield staging
        check_output(out, inputs, overwrite, error)
        if out.is_dir() and any(out.iterdir()):
            log.warning("--overwrite: what %s held was moved to %s", out, move_aside(out))
        elif out.is_dir():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_inputs(source: str | Path, chain: list[Path] | None = None) -> list[tuple[Path, bool]]:
    """What a trained model at ``source`` is made of, for :func:`check_output`: the path given, the
    weights of its ``load_from`` chain (as far as it can be followed), their checkpoint directories
    and runs (``whole``: a directory inside them is refused too, as is the source directory itself).
    ``chain``: the source's :func:`~lavis.models.weights_chain`, if known."""
    from lavis.models.weights import resolve_weights_path, run_dir_of, weights_chain

    source = Path(source)
    found: list[tuple[Path, bool]] = [(source, source.is_dir())]
    files = chain
    if files is None:
        try:
            files = weights_chain(str(source))
        except (FileNotFoundError, ValueError):
            files = [resolve_weights_path(str(source))]
    for file in files:
        found.append((file, file.is_dir()))
        own_config = (file.parent / ckpt.CONFIG_NAME).is_file() or (file.parent / ckpt.META_NAME).is_file()
        found.append((file.parent, own_config))  # a checkpoint or export directory; else a folder of files
        run = run_dir_of(file)
        if run is not None:
            found.append((run, True))
    return found
