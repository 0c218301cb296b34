"""A request -> what the engine takes (pure): the messages as ChatML turns with Qwen-VL's
``Picture n: <img>imageN</img>`` spans (and ``Video n: <video>videoN</video>`` ones), the sampling options
and the stop strings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lavis.processors.conversation import VISUAL_SPAN, pictures, video_reference
from lavis.serving.api.schema import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    TextPart,
)
from lavis.serving.engine import SamplingOptions


@dataclass(frozen=True)
class ChatPrompt:
    """A request's conversation in the engine's ChatML form, ``<img>name</img>`` where pictures go and
    ``<video>name</video>`` where videos go, and the URL of each picture and video by its name, in order."""

    messages: list[dict[str, str]]
    image_urls: dict[str, str]
    video_urls: dict[str, str] = field(default_factory=dict)


def image_name(number: int) -> str:
    """The name in ``<img>…</img>`` of a request's ``number``-th picture (its pixels go in memory)."""
    return f"image{number}"


def video_name(number: int) -> str:
    """The name in ``<video>…</video>`` of a request's ``number``-th video (its file goes with it)."""
    return f"video{number}"


def videos(paths: Iterable[str], first: int = 1) -> str:
    """Videos as the API and the web demo write them: ``Video n: <video>path</video>\\n`` each, numbered from
    ``first`` (apart from pictures, as Qwen2-VL's chat template numbers them), in the form of Qwen-VL's
    ``Picture n:`` lines."""
    return "".join(f"Video {n}: {video_reference(path)}\n" for n, path in enumerate(paths, first))


def build_prompt(messages: list[ChatMessage]) -> ChatPrompt:
    """OpenAI ``messages`` -> ChatML turns with Qwen-VL's ``Picture n: <img>imageN</img>\\n`` in place of
    each image part and ``Video n: <video>videoN</video>\\n`` in place of each video part (:func:`videos`),
    each kind numbered through the conversation. Images and videos go in user turns only; text may not
    carry ``<img>`` or ``<video>`` spans of its own (they would name files to read). Raises
    :class:`APIError` (400)."""
    turns: list[dict[str, str]] = []
    image_urls: dict[str, str] = {}
    video_urls: dict[str, str] = {}
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = message.content if isinstance(message.content, list) else [TextPart(type="text", text=message.content or "")]
        content: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                if VISUAL_SPAN.search(part.text):
                    raise APIError(400, "<img>…</img> or <video>…</video> in a message's text is not accepted: send "
                                   "pictures as image_url parts and videos as video_url parts",
                                   param=f"messages.{index}.content")
                content.append(part.text)
            elif role != "user":
                kind = "images" if isinstance(part, ImagePart) else "videos"
                raise APIError(400, f"{kind} go in user messages only, not in a {message.role} message",
                               param=f"messages.{index}.content")
            elif isinstance(part, ImagePart):
                name = image_name(len(image_urls) + 1)
                image_urls[name] = part.image_url.url
                content.append(pictures([name], len(image_urls)))
            else:
                name = video_name(len(video_urls) + 1)
                video_urls[name] = part.video_url.url
                content.append(videos([name], len(video_urls)))
        turns.append({"role": role, "content": "".join(content)})
    return ChatPrompt(turns, image_urls, video_urls)


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
