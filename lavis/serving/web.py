"""Web chat demo: ``python -m lavis.web --ckpt outputs/sft [--host 127.0.0.1 --port 7860]``.

A gradio page in the manner of Qwen-VL's ``web_demo_mm.py``: upload pictures, chat over several turns,
answers stream in as they are generated, and the boxes of an answer (``<ref>…</ref><box>…</box>``) are
drawn on the latest picture beside the chat. Each uploaded picture becomes the next
``Picture n: <img>path</img>`` of the conversation; with a model that takes video (``model.video_processor``
set), an uploaded video becomes the next ``Video n: <video>path</video>`` (the API's form). One
:class:`~lavis.serving.ChatEngine` serves every browser session, so concurrent users are generated in one batch.

The conversation logic (:class:`Conversation`, :func:`stream_answer`) needs no browser; the page is
:func:`build_demo`. Nothing is fetched from the network: no analytics, no share link.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio loads: no version check or analytics calls

import gradio as gr
from PIL import Image

import lavis
from lavis.models.chat import History
from lavis.processors.conversation import VISUAL_SPAN, pictures
from lavis.processors.errors import SkipSample
from lavis.processors.image import ImageTooLarge, open_bounded_image
from lavis.serving.api.limits import ServerSettings
from lavis.serving.api.prompts import videos
from lavis.serving.api.videos import video_seconds, why_no_video
from lavis.serving.boxes import draw_boxes
from lavis.serving.engine import ChatEngine, SamplingOptions

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # about 8000 x 6000; larger uploads are refused before decoding
DEFAULT_MAX_VIDEO_SECONDS = ServerSettings().max_video_seconds  # longer uploads are refused before decoding (as the API)
# What an upload is taken to be a video by (gradio keeps the upload's suffix); other files are pictures.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv"})
# Small pictures (e.g. the synthetic 128 px ones) fill the panel, so that boxes and labels can be read.
CSS = "#picture img { width: 100%; height: 100%; object-fit: contain; }"
_VISUAL_LINE = re.compile(rf"(?:Picture|Video) \d+: (?:{VISUAL_SPAN.pattern})\n", re.DOTALL)


class BadInput(ValueError):
    """Input the page refuses, with the message shown to the user."""


def open_picture(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``path`` as RGB; BadInput if PIL cannot read it or it has more than ``max_pixels``."""
    name = os.path.basename(path)  # the page shows the upload's name, not where gradio keeps it
    try:
        return open_bounded_image(path, max_pixels)
    except ImageTooLarge as err:
        raise BadInput(f"{name} is too large: {err}") from None
    except ValueError as err:
        raise BadInput(f"{name} is not an image PIL can read ({str(err).replace(path, name)})") from None


def is_video(path: str) -> bool:
    """Whether an upload is a video, by its suffix (:data:`VIDEO_SUFFIXES`)."""
    return os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


def check_video(path: str, max_seconds: float = DEFAULT_MAX_VIDEO_SECONDS) -> None:
    """BadInput if PyAV cannot open the video at ``path``, it has no frames, or it is over ``max_seconds`` long
    (checked from its container, before decoding)."""
    name = os.path.basename(path)
    try:
        seconds = video_seconds(path)
    except SkipSample as err:
        raise BadInput(f"{name} is not a video PyAV can read ({err.reason})") from None
    if seconds is not None and seconds > max_seconds:
        raise BadInput(f"{name} is too long: {seconds:.1f} s, over the {max_seconds:g}-second limit "
                       "(--max-video-seconds)")


@dataclass
class Conversation:
    """One browser session's chat: past turns, the pictures and videos sent so far and those waiting for the
    next query.

    ``history`` holds each turn's query as sent to the model (``Picture n: <img>path</img>\\n`` and
    ``Video n: <video>path</video>\\n`` lines, then the text) and its response. ``images`` and ``pending``
    hold pictures and videos by path in upload order, ``videos`` the paths that are videos. ``loaded``
    keeps every picture in memory by its path (a video: its path, the file the video processor reads).
    ``cleared``: the user started over; a turn still streaming into this conversation shows nothing more.
    """

    history: History = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    loaded: dict[str, Image.Image | str] = field(default_factory=dict)
    videos: set[str] = field(default_factory=set)
    cleared: bool = False

    def add_image(self, path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        """Attach the picture at ``path`` to the next query; BadInput if it cannot be used."""
        self.loaded[path] = open_picture(path, max_pixels)
        self.pending.append(path)

    def add_video(self, path: str, max_seconds: float = DEFAULT_MAX_VIDEO_SECONDS) -> None:
        """Attach the video at ``path`` to the next query; BadInput if it cannot be used (:func:`check_video`)."""
        check_video(path, max_seconds)
        self.loaded[path] = path
        self.videos.add(path)
        self.pending.append(path)

    def add_upload(self, path: str, no_video: str | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   max_seconds: float = DEFAULT_MAX_VIDEO_SECONDS) -> None:
        """Attach an uploaded file: a video (:func:`is_video`), refused with ``no_video`` (why the model takes
        none: :func:`~lavis.serving.api.videos.why_no_video`) when that is given, else a picture."""
        if not is_video(path):
            return self.add_image(path, max_pixels)
        if no_video:
            raise BadInput(f"{os.path.basename(path)}: this model takes no video ({no_video}); upload pictures, or "
                           "serve a native-resolution model with model.video_processor set")
        self.add_video(path, max_seconds)

    def query(self, text: str) -> str:
        """The next query as sent: the waiting pictures and videos, each kind numbered on from those already
        sent, then ``text``."""
        sent_videos = sum(path in self.videos for path in self.images)
        picture, video = len(self.images) - sent_videos + 1, sent_videos + 1
        parts = []
        for path in self.pending:
            if path in self.videos:
                parts.append(videos([path], video))
                video += 1
            else:
                parts.append(pictures([path], picture))
                picture += 1
        return "".join(parts) + text

    def messages(self, query: str) -> list[dict[str, str]]:
        """The ChatML messages of the history followed by ``query``."""
        messages = []
        for past_query, response in self.history:
            messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": response}]
        return [*messages, {"role": "user", "content": query}]

    def commit(self, query: str, response: str) -> None:
        """Record a finished turn; its pictures and videos are sent from now on."""
        sent = visual_paths(query)
        self.images += sent
        self.pending = [path for path in self.pending if path not in sent]
        self.history.append((query, response))

    def latest_picture(self) -> str | None:
        """The path of the newest picture, sent or waiting; None before any picture is uploaded."""
        shown = [path for path in self.images + self.pending if path not in self.videos]
        return shown[-1] if shown else None

    def drawn(self, response: str) -> Image.Image | None:
        """The newest picture with the boxes of ``response`` drawn on it (the picture as it is when the
        response has no box); None before any upload."""
        path = self.latest_picture()
        return None if path is None else draw_boxes(self.loaded[path], response)

    def chat_messages(self, current: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """The chat as gradio Chatbot messages: each turn's pictures and videos and its text, ``current`` (a
        turn in progress: query and response so far), then the pictures and videos waiting for the next query."""
        shown: list[dict[str, Any]] = []
        for query, response in [*self.history, *([current] if current else [])]:
            shown += [{"role": "user", "content": {"path": path}} for path in visual_paths(query)]
            shown.append({"role": "user", "content": _as_text(_VISUAL_LINE.sub("", query))})
            shown.append({"role": "assistant", "content": _as_text(response)})
        return shown + [{"role": "user", "content": {"path": path}} for path in self.pending]


def visual_paths(query: str) -> list[str]:
    """The paths of a query's ``<img>`` and ``<video>`` spans, in order."""
    return [m.group(1) if m.group(1) is not None else m.group(2) for m in VISUAL_SPAN.finditer(query)]


def _as_text(text: str) -> str:
    # The chat renders markdown with HTML; escaped, <ref>/<box> show as the model wrote them.
    return html.escape(text, quote=False)


def stream_answer(
    engine: ChatEngine, conversation: Conversation, text: str, options: SamplingOptions
) -> Iterator[tuple[str, str]]:
    """Ask ``text`` (with the waiting pictures and videos) and yield ``(query, response so far)`` as the answer
    is generated; once it ends, the turn is committed to ``conversation``. BadInput for an empty ``text``, one
    with an ``<img>…</img>`` or ``<video>…</video>`` span (pictures and videos are uploaded, never named) or a
    conversation the engine refuses (e.g. too long). ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` in ``text`` are plain text to
    the model (the engine encodes every message as Qwen-VL's chat does). A generation error propagates
    and commits nothing."""
    text = text.strip()
    if not text:
        raise BadInput("Type a message first.")
    if VISUAL_SPAN.search(text):  # it would name a file on the server to read
        raise BadInput("<img>…</img> or <video>…</video> in a message is not accepted: add pictures (and videos, when "
                       "the model takes them) with “Upload pictures”.")
    query = conversation.query(text)
    try:
        completion = engine.submit(conversation.messages(query), options, images=conversation.loaded)
    except (ValueError, FileNotFoundError) as err:
        raise BadInput(f"{err} (Clear history to start over.)") from None
    response = ""
    try:
        for piece in completion.stream():
            response += piece
            yield query, response
    finally:
        if not completion.done:  # the page went away or the turn was cancelled: stop generating it
            completion.cancel()
    conversation.commit(query, response)


def build_demo(
    engine: ChatEngine, max_new_tokens: int = 512, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, title: str = "",
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS,
) -> gr.Blocks:
    """The chat page, served by ``engine`` (shared by all sessions). ``max_new_tokens``: the slider's default.
    Videos can be uploaded when the engine's model has a video processor."""
    no_video = why_no_video(engine)
    takes_video = no_video is None

    def upload(files: list[str] | None, conversation: Conversation):
        for path in files or []:
            try:
                conversation.add_upload(path, no_video, max_image_pixels, max_video_seconds)
            except BadInput as err:
                gr.Warning(str(err))
        return conversation, conversation.chat_messages(), conversation.drawn("")

    def respond(
        text: str, conversation: Conversation, max_tokens: float, sample: bool, temperature: float, top_p: float
    ):
        try:
            options = SamplingOptions(int(max_tokens), sample, temperature, top_p)
            with contextlib.closing(stream_answer(engine, conversation, text, options)) as answer:
                for current in answer:
                    if conversation.cleared:  # closing the answer stops its generation
                        return
                    yield "", conversation, conversation.chat_messages(current), gr.skip()
        except Exception as err:  # noqa: BLE001 -- said in the page, which keeps working (the text stays, to retry)
            gr.Warning(str(err) if isinstance(err, ValueError) else f"Generation failed: {err}")
            if not conversation.cleared:
                yield text, conversation, conversation.chat_messages(), gr.skip()
            return
        if not conversation.cleared:
            yield "", conversation, conversation.chat_messages(), conversation.drawn(conversation.history[-1][1])

    def stop_answering(conversation: Conversation) -> None:
        conversation.cleared = True

    def clear():
        return "", Conversation(), [], None

    with gr.Blocks(title="LAVIS Qwen-VL chat", analytics_enabled=False) as demo:
        gr.Markdown(f"## LAVIS Qwen-VL chat{f' — {title}' if title else ''}\n"
                    f"Upload pictures{' or short videos' if takes_video else ''}, then ask about them. "
                    "Boxes in an answer are drawn on the latest picture.")
        conversation = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=3):
                # No share buttons: they post to Hugging Face.
                chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chat", feedback_options=None,
                                     buttons=["copy", "copy_all"])
                query = gr.Textbox(label="Message", placeholder="Ask about the pictures (Enter sends)",
                                   show_label=False, elem_id="query")
                with gr.Row():
                    # A model that takes video: videos too (the label stays short enough for one line).
                    upload_button = gr.UploadButton("Upload pictures", file_count="multiple", elem_id="upload",
                                                    file_types=["image", *(["video"] if takes_video else [])])
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear history", elem_id="clear")
            with gr.Column(scale=2):
                picture = gr.Image(label="Latest picture (boxes of the last answer drawn)", type="pil", format="png",
                                   interactive=False, height=400, buttons=["download", "fullscreen"], elem_id="picture")
                with gr.Accordion("Generation settings", open=False):
                    max_tokens = gr.Slider(1, engine.max_length or 4096, value=max_new_tokens, step=1,
                                           label="Max new tokens")
                    sample = gr.Checkbox(False, label="Sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature (when sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when sampling)")

        upload_button.upload(upload, [upload_button, conversation], [conversation, chatbot, picture])
        respond_inputs = [query, conversation, max_tokens, sample, temperature, top_p]
        respond_outputs = [query, conversation, chatbot, picture]
        # As many turns at once as the engine batches; later ones wait in gradio's queue.
        answers = [event(respond, respond_inputs, respond_outputs, concurrency_limit=engine.max_batch_size,
                         concurrency_id="respond") for event in (query.submit, send.click)]
        # The chat's own trash button clears the history too. A turn streaming meanwhile is stopped first, then the
        # page cleared: an update of that turn arriving after the clearing would show the old chat again.
        cleared = [query, conversation, chatbot, picture]
        for event in (clear_button.click, chatbot.clear):
            event(stop_answering, conversation, None, cancels=answers).then(clear, None, cleared)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's options (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m lavis.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="a run's output_dir, or a checkpoint directory / weights file in it")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the local network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="most answers generated together (1: batching off)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the page's default answer length")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger uploads are refused")
    parser.add_argument("--max-video-seconds", type=float, default=DEFAULT_MAX_VIDEO_SECONDS,
                        help="longer videos are refused (a model with model.video_processor only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load the model, start the engine and serve the page until interrupted."""
    args = parse_args(argv)
    model, _ = lavis.load_model(args.ckpt, device=args.device)
    engine = ChatEngine(model, max_batch_size=args.max_batch_size, read_image_files=False)  # uploads only
    try:
        demo = build_demo(engine, args.max_new_tokens, args.max_image_pixels, title=str(args.ckpt),
                          max_video_seconds=args.max_video_seconds)
        demo.queue().launch(server_name=args.host, server_port=args.port, share=False, css=CSS)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
