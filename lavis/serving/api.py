"""An OpenAI-compatible API for a trained model, as Qwen-VL's ``openai_api.py`` gives its users.

    python -m lavis.serve --ckpt outputs/sft [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                          [--max-batch-size 8] [--image-root DIR] [--allow-remote-images] [--device auto]
                          [--model-name NAME]

    from openai import OpenAI  # a server started with --image-root /data
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="sft", temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///data/cat.png"}},
        {"type": "text", "text": "What is it?"}]}])

``POST /v1/chat/completions`` (plain or ``stream: true``) and ``GET /v1/models``. Image parts are a
local path or a ``file://`` URL within ``--image-root`` (default: the working directory; relative paths
from it), a ``data:image/...;base64,`` URL, or (with ``--allow-remote-images``) an ``http(s)://`` URL;
each becomes ``Picture n: <img>imageN</img>\\n`` in its user turn (Qwen-VL's format) and goes to the
model in memory. Every message's text, whatever its role, is encoded as Qwen-VL's chat does:
``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` in it are plain text. Concurrent requests are
generated together in batches by :class:`lavis.serving.ChatEngine`. Errors come in OpenAI's shape,
``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lavis.models.chat import encode_chat, from_list_format
from lavis.processors.conversation import IMAGE_SPAN
from lavis.processors.image import ImageTooLarge, open_bounded_image
from lavis.serving.engine import ChatEngine, Completion, SamplingOptions

log = logging.getLogger(__name__)

MiB = 1 << 20
REMOTE_SCHEMES = ("http", "https")
EXIT_LOAD_FAILED = 2


@dataclass(frozen=True)
class ServerSettings:
    """The API's limits and switches (see ``python -m lavis.serve --help``)."""

    api_key: str | None = None
    allow_remote_images: bool = False
    max_request_bytes: int = 20 * MiB
    max_image_bytes: int = 10 * MiB
    max_image_pixels: int = 4096 * 4096
    remote_image_timeout_s: float = 10.0
    default_max_tokens: int = 512
    # Local paths and file:// URLs are read only within this directory (relative paths: from it); None:
    # refused. The command's default is the working directory.
    image_root: Path | None = None


class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------------------------- the request


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted, not used: every picture is resized to the encoder's size


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; fields this server does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # one model is served, whatever the name
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None


# ------------------------------------------------------------------ request -> conversation (pure)


@dataclass(frozen=True)
class ChatPrompt:
    """A request's conversation in the engine's ChatML form, ``<img>name</img>`` where pictures go, and
    the URL of each picture by its name, in order."""

    messages: list[dict[str, str]]
    image_urls: dict[str, str]


def image_name(number: int) -> str:
    """The name in ``<img>…</img>`` of a request's ``number``-th picture (its pixels go in memory)."""
    return f"image{number}"


def build_prompt(messages: list[ChatMessage]) -> ChatPrompt:
    """OpenAI ``messages`` -> ChatML turns with Qwen-VL's ``Picture n: <img>imageN</img>\\n`` in place of
    each image part, numbered through the conversation. Images go in user turns only; text may not
    carry ``<img>`` spans of its own (they would name files to read). Raises :class:`APIError` (400)."""
    turns: list[dict[str, str]] = []
    image_urls: dict[str, str] = {}
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = message.content if isinstance(message.content, list) else [TextPart(type="text", text=message.content or "")]
        items: list[dict[str, str]] = []
        first_picture = len(image_urls) + 1
        for part in parts:
            if isinstance(part, TextPart):
                if IMAGE_SPAN.search(part.text):
                    raise APIError(400, "<img>…</img> in a message's text is not accepted: send pictures as "
                                   "image_url parts", param=f"messages.{index}.content")
                items.append({"text": part.text})
            elif role != "user":
                raise APIError(400, f"images go in user messages only, not in a {message.role} message",
                               param=f"messages.{index}.content")
            else:
                name = image_name(len(image_urls) + 1)
                image_urls[name] = part.image_url.url
                items.append({"image": name})
        turns.append({"role": role, "content": from_list_format(items, first_picture)})
    return ChatPrompt(turns, image_urls)


def sampling_options(request: ChatCompletionRequest, default_max_tokens: int) -> SamplingOptions:
    """The engine's settings for a request: temperature 0 (or top_p 0) is greedy; without one,
    OpenAI's default temperature 1 samples."""
    if request.n != 1:
        raise APIError(400, f"n={request.n}: this server generates one choice per request (n=1)", param="n")
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if temperature == 0 or top_p == 0:
        return SamplingOptions(max_new_tokens=max_tokens)
    return SamplingOptions(max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_p=top_p)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The request's ``stop``: up to 4 non-empty strings (OpenAI's limit)."""
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > 4:
        raise APIError(400, f"stop: at most 4 strings, got {len(strings)}", param="stop")
    return [s for s in strings if s]


class StopMatcher:
    """Cuts streamed text before the first ``stop`` string: :meth:`feed` returns what can be sent and
    holds back a tail that may be the start of a stop string; ``hit`` once one is found."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.pending = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        text = self.pending + piece
        starts = [i for s in self.stop if (i := text.find(s)) >= 0]
        if starts:
            self.hit, self.pending = True, ""
            return text[: min(starts)]
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - held:]
        return text[: len(text) - held]

    def flush(self) -> str:
        """What is held back, once the text has ended without a stop string."""
        rest, self.pending = self.pending, ""
        return rest


# ----------------------------------------------------------------------------- reading pictures


def decode_base64_image(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/…;base64,…`` URL; 413 when over ``max_bytes``, 400 when malformed."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise APIError(400, "a data URL must look like data:image/<type>;base64,<data>", code="invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise APIError(413, f"a data URL's image is over the {max_bytes}-byte limit", code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"a data URL's base64 is malformed: {err}", code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise APIError(413, f"a data URL's image is over the {max_bytes}-byte limit", code="image_too_large")
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


def unreadable_image(number: int, where: str = "") -> APIError:
    """The one answer for a picture that cannot be used, whatever the reason: it says neither whether a
    path exists nor why it could not be read (the server logs that)."""
    return APIError(400, f"image {number}: cannot be read (not an image{where})", code="invalid_image")


def image_too_large(number: int, why: str) -> APIError:
    return APIError(413, f"image {number} is too large: {why}", code="image_too_large")


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


def read_local_image(path: Path, number: int, root: Path | None, max_bytes: int) -> bytes:
    """A local picture's bytes when it is a file in ``root`` (413 when over ``max_bytes``); anything
    else (outside the root, missing, not a file, unreadable) is the same 400."""
    refused = unreadable_image(number, " within the image root")
    file = within_root(path, root)
    if file is None:
        log.info("image %d: %s is not within the image root %s", number, path, root)
        raise refused
    try:
        if not file.is_file():
            raise FileNotFoundError(f"no file {file}")
        if file.stat().st_size > max_bytes:
            raise image_too_large(number, f"over the {max_bytes}-byte limit")
        with open(file, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except (OSError, ValueError) as err:
        log.info("image %d: cannot read %s: %s", number, file, err)
        raise refused from None
    if len(data) > max_bytes:
        raise image_too_large(number, f"over the {max_bytes}-byte limit")
    return data


def fetch_remote_image(url: str, number: int, max_bytes: int, timeout_s: float) -> bytes:
    """An ``http(s)://`` picture's bytes, reading at most ``max_bytes`` (413 beyond) within ``timeout_s``
    per network operation."""
    request = urllib.request.Request(url, headers={"User-Agent": "lavis-serve"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        log.info("image %d: cannot fetch %s: %s", number, short_url(url), err)
        raise APIError(400, f"image {number}: cannot be fetched from {short_url(url)}", code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise image_too_large(number, f"over the {max_bytes}-byte limit")
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


# ---------------------------------------------------------------------------------- responses


def usage(completion: Completion) -> dict[str, int]:
    """OpenAI's token counts of an answer (the prompt's include the picture tokens)."""
    prompt, generated = completion.prompt_tokens, len(completion.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def finish_reason(completion: Completion, stopped: bool) -> str:
    """OpenAI's ``length`` when the token limit cut the answer, else ``stop``."""
    return "length" if completion.finish_reason == "length" and not stopped else "stop"


def sse(data: Mapping[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class ChunkMaker:
    """``chat.completion.chunk`` objects of one streamed answer."""

    id: str
    created: int
    model: str

    def __call__(self, delta: dict[str, str], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


# -------------------------------------------------------------------------------- the middleware


async def send_error(error: APIError, scope: Any, receive: Any, send: Any) -> None:
    """Answer an ASGI request with ``error`` (from a middleware, before the app)."""
    await error.response()(scope, receive, send)


class APIKeyCheck:
    """ASGI middleware: requests to ``/v1`` need ``Authorization: Bearer <api_key>`` (401 otherwise),
    checked before the body is read."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            authorization = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = "Incorrect API key provided" if authorization else "Missing API key: send Authorization: Bearer <key>"
                return await send_error(APIError(401, message, code="invalid_api_key"), scope, receive, send)
        await self.app(scope, receive, send)


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


# ------------------------------------------------------------------------------------ the app


async def next_in_thread(pieces: Any) -> str | None:
    """The next of a blocking iterator's items, waited for in a worker thread (None at its end)."""
    return await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)


async def answer_pieces(completion: Completion, stop: StopMatcher) -> AsyncIterator[str]:
    """The answer's text as generated, cut at a stop string; the generation is cancelled when the
    text ends early (a stop string) or the consumer goes away (a streaming client disconnected)."""
    pieces = completion.stream()
    try:
        while not stop.hit and (piece := await next_in_thread(pieces)) is not None:
            if text := stop.feed(piece):
                yield text
        if rest := stop.flush():
            yield rest
    finally:
        if not completion.done:
            completion.cancel()
            log.debug("completion cancelled after %d tokens (%s)", len(completion.tokens),
                      "stop string" if stop.hit else "client went away")


def submit(engine: ChatEngine, prompt: ChatPrompt, images: dict[str, Image.Image], options: SamplingOptions,
           max_tokens_given: bool) -> Completion:
    """Queue a conversation (blocking: it is tokenized and its pictures processed). Without a
    requested token limit the default one shrinks to the room the model's context leaves."""
    try:
        return engine.submit(prompt.messages, options, images=images)
    except ValueError:
        if max_tokens_given or engine.max_length is None:
            raise
        input_ids, _ = encode_chat(engine.model, prompt.messages, images=images, read_files=False)
        room = engine.max_length - len(input_ids)
        if room < 1:
            raise
        return engine.submit(prompt.messages, replace(options, max_new_tokens=min(options.max_new_tokens, room)),
                             images=images)


def create_app(engine: ChatEngine, model_name: str, settings: ServerSettings | None = None) -> FastAPI:
    """The API serving ``engine``'s model as ``model_name`` (the caller owns and closes the engine)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="LAVIS OpenAI-compatible API", version="1")
    created = int(time.time())
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyCheck, api_key=settings.api_key)  # added last: runs first

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": str(error)}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return APIError(400, f"{param or 'body'}: {first['msg']}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return APIError(500, f"internal error: {type(error).__name__}", type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lavis"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        options = sampling_options(request, settings.default_max_tokens)
        stop = StopMatcher(stop_strings(request.stop))
        prompt = build_prompt(request.messages)
        images = {name: await run_in_threadpool(load_image, url, settings, number)
                  for number, (name, url) in enumerate(prompt.image_urls.items(), 1)}
        try:
            completion = await run_in_threadpool(submit, engine, prompt, images, options,
                                                 bool(request.max_tokens or request.max_completion_tokens))
        except (ValueError, FileNotFoundError) as err:
            raise APIError(400, str(err)) from None
        except RuntimeError as err:  # the engine is closed: the server is shutting down
            raise APIError(503, str(err), type="server_error") from None
        answer_id, answer_created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            chunk = ChunkMaker(answer_id, answer_created, model_name)
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(stream_events(completion, stop, chunk, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            if stop.stop:  # cut as generated, so that generation ends at the stop string
                text = "".join([piece async for piece in answer_pieces(completion, stop)])
            else:  # one wait for the whole answer: each hop from a worker thread waits for the GIL
                text = await anyio.to_thread.run_sync(completion.result, abandon_on_cancel=True)
        except Exception as err:  # noqa: BLE001 -- the generation's own error, logged by the engine
            raise APIError(500, f"generation failed: {err}", type="server_error") from None
        log_answer(answer_id, completion, stop)
        return {
            "id": answer_id, "object": "chat.completion", "created": answer_created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason(completion, stop.hit)}],
            "usage": usage(completion),
        }

    return app


async def stream_events(completion: Completion, stop: StopMatcher, chunk: ChunkMaker,
                        include_usage: bool) -> AsyncIterator[str]:
    """An answer as OpenAI's server-sent events: a role delta, content deltas, a chunk with the finish
    reason (then one with the usage, when asked), ``[DONE]``; a failed generation ends with an error event."""
    extra = {"usage": None} if include_usage else {}
    yield sse(chunk({"role": "assistant", "content": ""}, **extra))
    try:
        async for text in answer_pieces(completion, stop):
            yield sse(chunk({"content": text}, **extra))
    except Exception as err:  # noqa: BLE001 -- the generation's own error, logged by the engine
        yield sse(APIError(500, f"generation failed: {err}", type="server_error").body())
        return
    yield sse(chunk({}, finish_reason(completion, stop.hit), **extra))
    if include_usage:
        yield sse({**chunk({}), "choices": [], "usage": usage(completion)})
    yield sse("[DONE]")
    log_answer(chunk.id, completion, stop)


def log_answer(answer_id: str, completion: Completion, stop: StopMatcher) -> None:
    log.debug("%s: %d prompt + %d completion tokens, finish %s, %.2f s after submission", answer_id,
              completion.prompt_tokens, len(completion.tokens), finish_reason(completion, stop.hit),
              time.perf_counter() - completion.submitted)


# ------------------------------------------------------------------------------------ the command


def default_model_name(ckpt: str | Path) -> str:
    """The name a checkpoint is served as: its run directory's name (``outputs/sft`` -> ``sft``)."""
    from lavis.models import resolve_weights_path, run_dir_of

    weights = resolve_weights_path(str(ckpt))
    return (run_dir_of(weights) or weights.resolve().parent).name  # no run: the checkpoint's (export's) own


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(prog="python -m lavis.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a run's output_dir, or a checkpoint directory / weights file in it")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--api-key", default=os.environ.get("LAVIS_API_KEY"),
                        help="require Authorization: Bearer KEY (default: $LAVIS_API_KEY; none: no key needed)")
    parser.add_argument("--model-name", help="the model's name in the API (default: the checkpoint's run directory name)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="requests generated together (default: %(default)s; 1: batching off)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a request waits for others to join its batch (default: %(default)s)")
    parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs (refused otherwise)")
    parser.add_argument("--image-root", default=".",
                        help="local image paths and file:// URLs are read only within this directory, relative paths "
                             "from it (default: the working directory; 'none': local pictures refused)")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help="larger request bodies get a 413 (default: %(default)s)")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                        help="the most bytes of one picture: a data URL, a file or a download (default: %(default)s)")
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help="the most width x height of one picture (default: %(default)s)")
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens,
                        help="the answer's token limit when a request sets none, within what the context leaves "
                             "(default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.image_root.lower() == "none":
        args.image_root = None
    elif not Path(args.image_root).is_dir():
        parser.error(f"--image-root {args.image_root}: not a directory")
    else:
        args.image_root = Path(args.image_root).resolve()
    for option in ("max_batch_size", "max_request_bytes", "max_image_bytes", "max_image_pixels", "default_max_tokens"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Load the model, start the engine and serve the API until interrupted."""
    args = parse_args(argv)
    import uvicorn

    import lavis
    from lavis.tracking.logging import setup_logging

    setup_logging(getattr(logging, args.log_level.upper()))
    try:
        model, _ = lavis.load_model(args.ckpt, device=args.device)
        model_name = args.model_name or default_model_name(args.ckpt)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    settings = ServerSettings(
        api_key=args.api_key or None,
        allow_remote_images=args.allow_remote_images,
        max_request_bytes=args.max_request_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        default_max_tokens=args.default_max_tokens,
        image_root=args.image_root,
    )
    if not settings.api_key and not is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use the model%s", args.host,
                    " and make this machine fetch URLs" if settings.allow_remote_images else "")
    engine = ChatEngine(model, max_batch_size=args.max_batch_size, batch_window_s=args.batch_window_ms / 1000,
                        read_image_files=False)  # pictures come with the request, as image_url parts
    log.info("local pictures: %s", f"within {settings.image_root}" if settings.image_root else "refused")
    try:
        log.info("serving %s (batches of up to %d) on http://%s:%d/v1", model_name, args.max_batch_size, args.host, args.port)
        uvicorn.run(create_app(engine, model_name, settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
