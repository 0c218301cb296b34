"""Span paths and video span names, shared by the conversation builders and the evaluation-style ones.

The picture or video of an evaluation-style record (``vqa``, ``multiple_choice``): ``"image"``, or
``"video"``: a video file, a directory of its frames (read in natural name order) or a list of frame
files, relative to ``image_root``. Either is written into the prompt as its span, ``<img>path</img>`` or
``<video>name</video>``; a frame list's name is ``{their directory}#1``, its frames in the record's
``videos`` mapping (``{name: {"frames": [paths]}}``), as the conversation builders write them and
:class:`~lavis.processors.sample.SampleProcessor` and the evaluation read them."""

from __future__ import annotations

import posixpath
from typing import Any

from lavis.datasets.builders.base import AnnotationError, image_path, require_str
from lavis.processors.conversation import image_reference, video_reference


def span_path(where: str, value: Any, what: str) -> str:
    """A path fit for an ``<img>``/``<video>`` span (a ``file://`` prefix, qwen-vl-utils' local form, dropped)."""
    path = require_str(where, value, what).removeprefix("file://")
    if not path or any(c in path for c in "<>\n"):
        raise AnnotationError(f"{where}: {what} {path!r} is empty or contains '<', '>' or a newline")
    return path


def video_source(where: str, video: Any, number: int, sources: dict[str, dict[str, Any]], fps: Any = None) -> str:
    """The ``<video>`` span name of one video: a path (a file or a directory of frames) as it is; a list of frame
    files ``{their directory}#{number}``, its frames put in ``sources[name]``. ``fps`` is qwen-vl-utils' per-video
    key: the rate a file is sampled at; for frames, the rate they were taken at, every frame kept."""
    if isinstance(video, str):
        name, entry = span_path(where, video, "the video path"), {}
    elif isinstance(video, list):
        frames = [span_path(where, frame, "a video frame path") for frame in video]
        name = f"{(posixpath.dirname(frames[0]) if frames else '') or 'frames'}#{number}"
        entry = {"frames": frames}
    else:
        raise AnnotationError(f"{where}: a video is a path or a list of frame paths, got {type(video).__name__}")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise AnnotationError(f"{where}: a video's fps must be a positive number, got {fps!r}")
        entry.update(fps=float(fps), **({"frames_fps": float(fps)} if "frames" in entry else {}))
    if entry:
        if sources.setdefault(name, entry) != entry:
            raise AnnotationError(f"{where}: video {name!r} is given twice with different fps (copy the file)")
    return name


def video_span(where: str, video: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    """``(name, videos)``: the ``<video>`` span name of a record's ``"video"`` and its ``videos`` mapping
    (empty for a file or directory; a frame list's frames under its name)."""
    if isinstance(video, list) and not video:
        raise AnnotationError(f"{where}: 'video' is an empty list of frames")
    sources: dict[str, dict[str, Any]] = {}
    return video_source(where, video, 1, sources), sources


def record_media(where: str, record: dict[str, Any], required: bool = True) -> tuple[str | None, str | None, dict]:
    """``(image, video, videos)`` of a record: one of its ``"image"`` and ``"video"`` keys (the other None),
    and the ``videos`` mapping of a frame list (see the module notes). Both keys given is an AnnotationError,
    and so is neither when ``required``."""
    image, video = record.get("image"), record.get("video")
    if image is not None and video is not None:
        raise AnnotationError(f"{where}: both 'image' and 'video'; a record takes one of them")
    if video is not None:
        return (None, *video_span(where, video))
    if image is None and required:
        raise AnnotationError(f"{where}: missing key 'image' (or 'video': a video file, a directory of frames or "
                              "a list of frame files)")
    return (image_path(where, image) if image is not None else None), None, {}


def media_reference(image: str | None, video: str | None) -> str:
    """The span of a record's picture or video (empty without either)."""
    if video is not None:
        return video_reference(video)
    return image_reference(image) if image is not None else ""
