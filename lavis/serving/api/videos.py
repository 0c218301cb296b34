"""Reading a request's videos (``video_url`` parts) into files the model's video processor decodes with PyAV:
a local path or ``file://`` URL within the image root as it is, a base64 ``data:video/…`` URL (or an
``http(s)://`` one, when remote URLs are allowed) written to a temporary file of :class:`VideoFiles`,
removed once the conversation is encoded. Each is checked before decoding: over ``max_video_bytes`` or
``max_video_seconds`` a 413, one PyAV cannot open or with no frames a 400 naming the reason (the video
processor's ``corrupt_video`` / ``empty_video``). A longer video within the limit is sampled down by the
processor (at most its ``max_frames``), never refused."""

from __future__ import annotations

import logging
import mimetypes
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lavis.processors.errors import SkipSample
from lavis.serving.api.images import (
    REMOTE_SCHEMES,
    decode_base64_image,
    fetch_remote_image,
    image_too_large,
    local_file,
    local_image_path,
    short_url,
)
from lavis.serving.api.limits import ServerSettings
from lavis.serving.api.schema import APIError

log = logging.getLogger(__name__)


def why_no_video(engine: Any) -> str | None:
    """Why the engine's model takes no video (its config's ``model.video_processor`` is null, or its vision
    encoder is a fixed-size one); None when it takes video."""
    model = getattr(engine, "model", None)
    if getattr(getattr(model, "processors", None), "video", None) is None:
        return "its config's model.video_processor is null"
    if not getattr(model, "native_resolution", False):
        return ("it is a fixed-size model: its model.video_processor is used with a native-resolution vision encoder "
                "only (model.vision: qwen2_vl_vit)")
    return None


def video_unsupported(model_name: str, why: str) -> APIError:
    """The 400 for a video sent to a model that takes none (``why``: :func:`why_no_video`)."""
    return APIError(400, f"the model {model_name!r} takes no video: {why}. Send pictures as image_url parts, or serve "
                    "a native-resolution model with model.video_processor set (e.g. {type: qwen2_vl_video})",
                    code="video_unsupported", param="messages")


class VideoFiles:
    """The temporary files of one request's uploaded videos, in a directory of their own removed on
    :meth:`close` (``with VideoFiles() as files: ...``)."""

    def __init__(self) -> None:
        self.directory: Path | None = None

    def write(self, data: bytes, name: str, suffix: str) -> Path:
        """``data`` as the file ``name`` + ``suffix`` (e.g. ``video1.mp4``) in the directory."""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="lavis-video-"))
        path = self.directory / f"{name}{suffix}"
        path.write_bytes(data)
        return path

    def scrub(self, message: str) -> str:
        """``message`` without the temporary directory (a client sees its video's name only)."""
        return message if self.directory is None else message.replace(f"{self.directory}/", "")

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> VideoFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def video_suffix(media_type: str) -> str:
    """A file suffix for a video's media type (``video/mp4`` -> ``.mp4``); PyAV reads the container from the bytes."""
    known = mimetypes.guess_extension(media_type, strict=False)
    if known:
        return known
    subtype = media_type.partition("/")[2]
    return f".{subtype}" if re.fullmatch(r"[a-z0-9]{1,8}", subtype) else ".video"


def video_seconds(path: str | Path) -> float | None:
    """A video file's length in seconds, read from its container without decoding (its stream's duration,
    else the container's, else its frames over its rate; None when none is known). SkipSample
    ``corrupt_video`` when PyAV cannot open it, ``empty_video`` without a video stream or frames."""
    import av  # PyAV: only where a video is read

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SkipSample("empty_video", "no video stream")
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:  # in microseconds
                return container.duration / 1e6
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if frames < 1:
                raise SkipSample("empty_video", "no frames")
            rate = stream.average_rate or stream.guessed_rate
            return frames / float(rate) if rate else None
    except SkipSample:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise SkipSample("corrupt_video", f"PyAV cannot open it: {str(err).replace(str(path), Path(path).name)}") from None


def check_video(path: Path, number: int, max_seconds: float) -> None:
    """The ``number``-th video's file can be opened and is at most ``max_seconds`` long: 400 naming the reason, 413."""
    try:
        seconds = video_seconds(path)
    except SkipSample as err:
        log.info("video %d: %s: %s", number, err.reason, err)
        raise APIError(400, f"video {number}: cannot be decoded ({err.reason}: {err})", code="invalid_video") from None
    if seconds is not None and seconds > max_seconds:
        raise image_too_large(number, f"{seconds:.1f} s, over the {max_seconds:g}-second limit (--max-video-seconds)", "video")


def load_video(url: str, settings: ServerSettings, files: VideoFiles, number: int = 1) -> Path:
    """The file of the ``number``-th video part, read (blocking) as its URL says within the settings'
    limits and checked by :func:`check_video`; a data URL or a download is written to ``files``."""
    scheme = urlsplit(url).scheme.lower()
    name = f"video{number}"
    if scheme == "data":
        data = decode_base64_image(url, settings.max_video_bytes, "video")
        path = files.write(data, name, video_suffix(url[5:].partition(";")[0].lower()))
    elif scheme in REMOTE_SCHEMES:
        if not settings.allow_remote_images:
            raise APIError(400, f"remote video URLs are refused ({short_url(url)}): start the server with "
                           "--allow-remote-images to fetch them, or send the video as a data: URL",
                           code="remote_images_disabled")
        data = fetch_remote_image(url, number, settings.max_video_bytes, settings.remote_image_timeout_s, "video")
        suffix = Path(urlsplit(url).path).suffix
        path = files.write(data, name, suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ".video")
    elif (local := local_image_path(url)) is not None:
        path = local_file(local, number, settings.image_root, settings.max_video_bytes, "video")
    else:
        raise APIError(400, f"unsupported video URL {short_url(url)}: expected a path, file://, data: or "
                       "http(s)://", code="invalid_video_url")
    check_video(path, number, settings.max_video_seconds)
    return path
