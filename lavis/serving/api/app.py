"""The app and the command: :func:`create_app` (the routes, OpenAI's errors, the API key check) and
``python -m lavis.serve``'s :func:`parse_args` and :func:`main`. It imports the other modules here."""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lavis.models.chat import encode_chat
from lavis.serving.api.images import load_image
from lavis.serving.api.limits import RequestSizeLimit, ServerSettings, send_error
from lavis.serving.api.prompts import (
    ChatPrompt,
    build_prompt,
    sampling_options,
    stop_strings,
)
from lavis.serving.api.schema import (
    APIError,
    ChatCompletionRequest,
    finish_reason,
    usage,
)
from lavis.serving.api.streaming import (
    ChunkMaker,
    StopMatcher,
    answer_pieces,
    log_answer,
    stream_events,
)
from lavis.serving.api.videos import VideoFiles, load_video, video_unsupported, why_no_video
from lavis.serving.engine import ChatEngine, Completion, SamplingOptions

log = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 2

# The command's --help.
DESCRIPTION = """An OpenAI-compatible API for a trained model, as Qwen-VL's ``openai_api.py`` gives its users.

    python -m lavis.serve --ckpt outputs/sft [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                          [--max-batch-size 8] [--image-root DIR] [--allow-remote-images] [--device auto]
                          [--model-name NAME] [--max-video-bytes N] [--max-video-seconds S]

    from openai import OpenAI  # a server started with --image-root /data
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="sft", temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///data/cat.png"}},
        {"type": "text", "text": "What is it?"}]}])

``POST /v1/chat/completions`` (plain or ``stream: true``) and ``GET /v1/models``. Image parts are a
local path or a ``file://`` URL within ``--image-root`` (default: the working directory; relative paths
from it), a ``data:image/...;base64,`` URL, or (with ``--allow-remote-images``) an ``http(s)://`` URL;
each becomes ``Picture n: <img>imageN</img>\\n`` in its user turn (Qwen-VL's format) and goes to the
model in memory. Video parts (``{"type": "video_url", "video_url": {"url": ...}}``, a model with
``model.video_processor`` only) take the same URLs (``data:video/...;base64,``) and become
``Video n: <video>videoN</video>\\n``; the model's video processor decodes them (PyAV) and samples their
frames. Every message's text, whatever its role, is encoded as Qwen-VL's chat does:
``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` in it are plain text. Concurrent requests are
generated together in batches by :class:`lavis.serving.ChatEngine`. Errors come in OpenAI's shape,
``{"error": {"message", "type", "code", "param"}}``.
"""


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


def submit(engine: ChatEngine, prompt: ChatPrompt, images: dict[str, Image.Image | str], options: SamplingOptions,
           max_tokens_given: bool) -> Completion:
    """Queue a conversation (blocking: it is tokenized and its pictures and videos processed; ``images``:
    pictures, and the files of videos, by name). Without a requested token limit the default one shrinks
    to the room the model's context leaves."""
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
        if prompt.video_urls and (why := why_no_video(engine)):
            raise video_unsupported(model_name, why)
        images: dict[str, Image.Image | str] = {name: await run_in_threadpool(load_image, url, settings, number)
                                                for number, (name, url) in enumerate(prompt.image_urls.items(), 1)}
        with VideoFiles() as files:  # uploaded videos: removed once the conversation is encoded
            for number, (name, url) in enumerate(prompt.video_urls.items(), 1):
                images[name] = str(await run_in_threadpool(load_video, url, settings, files, number))
            try:
                completion = await run_in_threadpool(submit, engine, prompt, images, options,
                                                     bool(request.max_tokens or request.max_completion_tokens))
            except (ValueError, FileNotFoundError) as err:
                raise APIError(400, files.scrub(str(err))) from None
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


def default_model_name(ckpt: str | Path) -> str:
    """The name a checkpoint is served as: its run directory's name (``outputs/sft`` -> ``sft``)."""
    from lavis.models.weights import resolve_weights_path, run_dir_of

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
    parser = argparse.ArgumentParser(prog="python -m lavis.serve", description=DESCRIPTION,
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
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s):// image and video URLs (refused otherwise)")
    parser.add_argument("--image-root", default=".",
                        help="local image and video paths and file:// URLs are read only within this directory, relative "
                             "paths from it (default: the working directory; 'none': local pictures and videos refused)")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help="larger request bodies get a 413 (default: %(default)s)")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                        help="the most bytes of one picture: a data URL, a file or a download (default: %(default)s)")
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help="the most width x height of one picture (default: %(default)s)")
    parser.add_argument("--max-video-bytes", type=int, default=defaults.max_video_bytes,
                        help="the most bytes of one video: a data URL, a file or a download (default: %(default)s)")
    parser.add_argument("--max-video-seconds", type=float, default=defaults.max_video_seconds,
                        help="the longest video, refused before decoding; the model's video processor samples at most "
                             "its max_frames of one (default: %(default)s)")
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
    for option in ("max_batch_size", "max_request_bytes", "max_image_bytes", "max_image_pixels", "max_video_bytes",
                   "max_video_seconds", "default_max_tokens"):
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
        max_video_bytes=args.max_video_bytes,
        max_video_seconds=args.max_video_seconds,
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
