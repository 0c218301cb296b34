"""The API's limits: :class:`ServerSettings` (its limits and switches) and the ASGI middleware that
answers a request body over ``max_request_bytes`` with a 413 before the app reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavis.serving.api.schema import APIError

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """The API's limits and switches (see ``python -m lavis.serve --help``)."""

    api_key: str | None = None
    allow_remote_images: bool = False
    max_request_bytes: int = 20 * MiB
    max_image_bytes: int = 10 * MiB
    max_image_pixels: int = 4096 * 4096
    # A video part (video_url): its bytes (a data URL, a file or a download) and its length; longer videos
    # are refused before decoding (the video processor samples at most max_frames of a shorter one).
    max_video_bytes: int = 64 * MiB
    max_video_seconds: float = 600.0
    remote_image_timeout_s: float = 10.0
    default_max_tokens: int = 512
    # Local paths and file:// URLs (pictures and videos) are read only within this directory (relative paths:
    # from it); None: refused. The command's default is the working directory.
    image_root: Path | None = None


async def send_error(error: APIError, scope: Any, receive: Any, send: Any) -> None:
    """Answer an ASGI request with ``error`` (from a middleware, before the app)."""
    await error.response()(scope, receive, send)


class RequestSizeLimit:
    """ASGI middleware: a body over ``max_bytes`` is a 413, by its Content-Length before reading and by
    the bytes received while reading (chunked bodies); the app gets the body once read in full."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over the {self.max_bytes}-byte limit", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await send_error(APIError(400, "invalid Content-Length"), scope, receive, send)
            if int(declared) > self.max_bytes:
                return await send_error(too_large, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(too_large, scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Any:  # the body once, then the client's own messages (a disconnect)
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)
