"""Reading a request's pictures: local paths and ``file://`` URLs within the image root, base64
``data:`` URLs, ``http(s)://`` ones only when allowed; over the byte or pixel limits: a 413. The byte
readers take ``kind`` (``image`` or ``video``: :mod:`lavis.serving.api.videos` reads videos with them)."""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from lavis.processors.image import ImageTooLarge, open_bounded_image
from lavis.serving.api.limits import ServerSettings
from lavis.serving.api.schema import APIError

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https")


def decode_base64_image(url: str, max_bytes: int, kind: str = "image") -> bytes:
    """The bytes of a ``data:image/…;base64,…`` URL (``data:video/…`` for a video); 413 when over
    ``max_bytes``, 400 when malformed."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith(f"data:{kind}/") or not header.lower().endswith(";base64"):
        raise APIError(400, f"a data URL must look like data:{kind}/<type>;base64,<data>", code=f"invalid_{kind}_url")
    too_large = APIError(413, f"a data URL's {kind} is over the {max_bytes}-byte limit (--max-{kind}-bytes)",
                         code=f"{kind}_too_large")
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise too_large
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"a data URL's base64 is malformed: {err}", code=f"invalid_{kind}_url") from None
    if len(data) > max_bytes:
        raise too_large
    return data


def local_image_path(url: str) -> Path | None:
    """The file a ``file://`` URL or a plain path names; None for other URLs."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"{url}: a file:// URL must name a file on this machine", code="invalid_image_url")
        return Path(urllib.request.url2pathname(parts.path))
    return Path(url) if scheme == "" else None


def unreadable_image(number: int, where: str = "", kind: str = "image") -> APIError:
    """The one answer for a picture (a video) that cannot be used, whatever the reason: it says neither
    whether a path exists nor why it could not be read (the server logs that)."""
    article = "an" if kind == "image" else "a"
    return APIError(400, f"{kind} {number}: cannot be read (not {article} {kind}{where})", code=f"invalid_{kind}")


def image_too_large(number: int, why: str, kind: str = "image") -> APIError:
    return APIError(413, f"{kind} {number} is too large: {why}", code=f"{kind}_too_large")


def within_root(path: Path, root: Path | None) -> Path | None:
    """``path`` (relative paths: from ``root``) with its symbolic links followed, when it lies in
    ``root``; None outside it, and always without a root."""
    if root is None:
        return None
    try:
        root = root.resolve()
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL in the path
        return None
    return resolved if resolved.is_relative_to(root) else None


def local_file(path: Path, number: int, root: Path | None, max_bytes: int, kind: str = "image") -> Path:
    """A local picture's (video's) file, its links followed, when it is a file in ``root`` of at most
    ``max_bytes`` (413 beyond); anything else (outside the root, missing, not a file) is the same 400."""
    refused = unreadable_image(number, " within the image root", kind)
    file = within_root(path, root)
    if file is None:
        log.info("%s %d: %s is not within the image root %s", kind, number, path, root)
        raise refused
    try:
        if not file.is_file():
            raise FileNotFoundError(f"no file {file}")
        size = file.stat().st_size
    except (OSError, ValueError) as err:
        log.info("%s %d: cannot read %s: %s", kind, number, file, err)
        raise refused from None
    if size > max_bytes:
        raise image_too_large(number, f"over the {max_bytes}-byte limit (--max-{kind}-bytes)", kind)
    return file


def read_local_image(path: Path, number: int, root: Path | None, max_bytes: int) -> bytes:
    """A local picture's bytes when it is a file in ``root`` (413 when over ``max_bytes``); anything
    else (outside the root, missing, not a file, unreadable) is the same 400."""
    refused = unreadable_image(number, " within the image root")
    file = local_file(path, number, root, max_bytes)
    try:
        with open(file, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except (OSError, ValueError) as err:
        log.info("image %d: cannot read %s: %s", number, file, err)
        raise refused from None
    if len(data) > max_bytes:
        raise image_too_large(number, f"over the {max_bytes}-byte limit (--max-image-bytes)")
    return data


def fetch_remote_image(url: str, number: int, max_bytes: int, timeout_s: float, kind: str = "image") -> bytes:
    """An ``http(s)://`` picture's (video's) bytes, reading at most ``max_bytes`` (413 beyond) within
    ``timeout_s`` per network operation."""
    request = urllib.request.Request(url, headers={"User-Agent": "lavis-serve"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        log.info("%s %d: cannot fetch %s: %s", kind, number, short_url(url), err)
        raise APIError(400, f"{kind} {number}: cannot be fetched from {short_url(url)}", code=f"invalid_{kind}_url") from None
    if len(data) > max_bytes:
        raise image_too_large(number, f"over the {max_bytes}-byte limit (--max-{kind}-bytes)", kind)
    return data


def decode_image(data: bytes, number: int, max_pixels: int, where: str = "") -> Image.Image:
    """Picture bytes -> RGB; the size is checked before the pixels are decoded: over ``max_pixels`` (or
    PIL's decompression-bomb limit) is a 413; an unreadable picture the 400 of :func:`unreadable_image`."""
    try:
        return open_bounded_image(data, max_pixels)
    except ImageTooLarge as err:
        raise image_too_large(number, str(err)) from None
    except Exception as err:  # noqa: BLE001 -- PIL raises many kinds on a malformed file; the client gets one answer
        log.info("image %d: not a picture PIL can read: %s: %s", number, type(err).__name__, err)
        raise unreadable_image(number, where) from None


def short_url(url: str) -> str:
    """A URL short enough for an error message (data URLs are long)."""
    return url if len(url) <= 80 else url[:60] + "…"


def load_image(url: str, settings: ServerSettings, number: int = 1) -> Image.Image:
    """The ``number``-th image part's picture, read (blocking) as its URL says, within the settings'
    limits; local paths and ``file://`` URLs only within ``settings.image_root``."""
    scheme = urlsplit(url).scheme.lower()
    where = ""
    if scheme == "data":
        data = decode_base64_image(url, settings.max_image_bytes)
    elif scheme in REMOTE_SCHEMES:
        if not settings.allow_remote_images:
            raise APIError(400, f"remote image URLs are refused ({short_url(url)}): start the server with "
                           "--allow-remote-images to fetch them, or send the picture as a data: URL",
                           code="remote_images_disabled")
        data = fetch_remote_image(url, number, settings.max_image_bytes, settings.remote_image_timeout_s)
    elif (path := local_image_path(url)) is not None:
        where = " within the image root"
        data = read_local_image(path, number, settings.image_root, settings.max_image_bytes)
    else:
        raise APIError(400, f"unsupported image URL {short_url(url)}: expected a path, file://, data: or "
                       "http(s)://", code="invalid_image_url")
    return decode_image(data, number, settings.max_image_pixels, where)
