"""Chat with a trained model: Qwen-VL's query format, its chat encoding and multi-turn chat.

    import lavis
    model, processors = lavis.load_model("outputs/sft")
    response, history = model.chat([{"image": "data/synthetic/images/test/000000.png"},
                                    {"text": "What colour is the shape?"}])
    response, history = model.chat("Where is it?", history=history)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from lavis.models.generation import left_pad, until_stop
from lavis.models.vlm import VisionLanguageModel
from lavis.processors.conversation import (
    IMAGE_SPAN,
    ConversationEncoder,
    image_reference,
    pictures,
    video_reference,
)
from lavis.processors.errors import SkipSample
from lavis.processors.image import load_image
from lavis.processors.tokenizer import IMAGE_SPECIALS

log = logging.getLogger(__name__)

History = list[tuple[str, str]]


def from_list_format(items: list[dict[str, Any]], first_picture: int = 1) -> str:
    """Qwen-VL's query format: ``[{"image": path}, {"text": ...}, {"box": (x1, y1, x2, y2), "ref"?}]`` ->
    ``Picture 1: <img>path</img>\\n...``. Boxes are in Qwen-VL's [0, 1000) coordinates.
    """
    parts, picture = [], first_picture
    for item in items:
        if "image" in item:
            parts.append(pictures([item["image"]], picture))
            picture += 1
        elif "box" in item:
            x1, y1, x2, y2 = (int(v) for v in item["box"])
            ref = f"<ref>{item['ref']}</ref>" if item.get("ref") else ""
            parts.append(f"{ref}<box>({x1},{y1}),({x2},{y2})</box>")
        elif "text" in item:
            parts.append(item["text"])
        else:
            raise ValueError(f"unknown query item {item!r}: expected a key 'image', 'text' or 'box'")
    return "".join(parts)


def encode_chat(
    model: VisionLanguageModel,
    messages: list[dict[str, str]],
    system_message: str | None = None,
    images: Mapping[str, Image.Image] | None = None,
    read_files: bool = True,
) -> tuple[list[int], torch.Tensor]:
    """A conversation ready for generation: its ChatML token ids, ending with the assistant's turn
    opened, and its pictures' pixels ``[n, 3, H, W]`` in order.

    ``messages``: ``{"role": "system" | "user" | "assistant", "content"}`` with ``<img>path</img>`` where
    images go (a first system turn replaces ``system_message``, which defaults to the model's).
    Every text is encoded as Qwen-VL's chat encodes it: only the image and box tokens (``<img>``,
    ``<ref>``, ``<box>``, ...: ``IMAGE_SPECIALS``) are special, so ``<|im_start|>``, ``<|im_end|>`` and
    ``<|endoftext|>`` written in a message are plain text and cannot end or open a turn.
    ``images``: pictures (and videos: decoded frames ``[T, H, W, 3]``) already in memory, by the path their
    ``<img>`` (``<video>``) names; others are read from
    disk, unless ``read_files`` is False (then they are a ValueError). A stray image token in the text
    is a ValueError, a missing or unreadable image a FileNotFoundError, each naming it.
    """
    if model.processors is None:
        raise ValueError("this model has no processors attached: use lavis.load_model, or model.attach_processors(...)")
    tokenizer, image_processor = model.processors.tokenizer, model.processors.image
    encoder = ConversationEncoder(tokenizer, model.image_tokens, system_message or model.system_message, 1 << 30,
                                  allowed_special=IMAGE_SPECIALS)

    video_processor = getattr(model.processors, "video", None)  # attach_processors takes any tokenizer + image pair

    def picture(path: str, video: bool = False):
        if video and video_processor is None:
            raise ValueError(f"{video_reference(path)}: this model has no video processor")
        if images and path in images:
            return video_processor(images[path]) if video else image_processor(images[path])
        if not read_files:
            raise ValueError(f"{(video_reference if video else image_reference)(path)} names no picture of the request: "
                             "pictures are sent, not read from disk")
        try:
            return video_processor(path) if video else image_processor(load_image(path))
        except SkipSample as err:
            raise FileNotFoundError(str(err)) from None

    try:
        encoded = encoder.encode_messages(messages, add_generation_prompt=True, images=picture)
    except SkipSample as err:  # e.g. a stray <img> token in the text
        raise ValueError(str(err)) from None
    return encoded.input_ids, image_processor.batch(encoded.processed)


def chat(
    model: VisionLanguageModel,
    query: str | list[dict[str, Any]],
    history: History | None = None,
    system_message: str | None = None,
    max_new_tokens: int = 256,
    **generation: Any,
) -> tuple[str, History]:
    """One chat turn: the response to ``query`` after ``history``, and the history including it.

    ``query``: text (with ``<img>path</img>`` where images go) or Qwen-VL's list format; in the list
    format pictures are numbered on from those already in ``history``. Image paths are read from
    disk as given (relative paths: from the working directory). The query, the history and
    ``system_message`` are encoded as Qwen-VL's chat encodes them: ``<|im_start|>``, ``<|im_end|>`` and
    ``<|endoftext|>`` in them are plain text (see :func:`encode_chat`). ``generation``: options of
    :meth:`VisionLanguageModel.generate` (``num_beams``, ``do_sample``, ``temperature``, ``top_p``).
    """
    history = list(history or [])
    if not isinstance(query, str):
        seen = sum(len(IMAGE_SPAN.findall(q)) for q, _ in history)
        query = from_list_format(query, first_picture=seen + 1)
    messages = []
    for past_query, past_response in history:
        messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_response}]
    messages.append({"role": "user", "content": query})
    input_ids, pixels = encode_chat(model, messages, system_message)
    tokenizer = model.processors.tokenizer
    input_ids, attention_mask = left_pad([input_ids], tokenizer.pad_id)
    tokens = model.generate(
        input_ids,
        attention_mask,
        pixels,
        max_new_tokens=max_new_tokens,
        stop_ids=tokenizer.stop_ids,
        pad_id=tokenizer.pad_id,
        suppress_ids=tokenizer.image_span_ids,
        **generation,
    )[0].tolist()
    response = tokenizer.decode(until_stop(tokens, tokenizer.stop_ids))
    return response, history + [(query, response)]

