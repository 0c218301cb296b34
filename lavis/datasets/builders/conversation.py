"""Conversation builders: Qwen-VL's fine-tuning JSON, LLaVA's JSON (LLaVA-Video's and Qwen2.5-VL's
``qwen-vl-finetune``'s too, with videos) and the message form of Qwen2-VL's model card (qwen-vl-utils,
transformers' chat templates, ms-swift).

A video is written in the text as ``<video>name</video>``: ``name`` is its file's or frame directory's path
(relative to ``image_root``), or, for a list of frame files, ``{their directory}#{n}`` (n: the video's number in
the record) with the frames in the converted record's ``videos`` mapping (``{name: {"frames": [paths]}}``, plus
``fps`` / ``frames_fps`` where the record gives a rate), which :class:`~lavis.processors.sample.SampleProcessor`
reads first."""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from typing import Any, Literal

from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    SkipCounter,
    as_paths,
    describe_record,
    read_annotations,
)
from lavis.datasets.builders.media import span_path, video_source
from lavis.processors.boxes import box_problems
from lavis.processors.conversation import ROLES, image_reference, pictures, video_reference
from lavis.processors.native_video import FRAME_SUFFIXES

log = logging.getLogger(__name__)


def _conversations(path: str, index: int, record: Any, roles: dict[str, str]) -> list[dict[str, str]]:
    where = describe_record(path, index, record)
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise AnnotationError(f"{where}: expected an object with a 'conversations' list")
    messages = []
    for turn_no, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise AnnotationError(f"{where}, turn {turn_no}: expected {{'from': ..., 'value': str}}")
        if turn["from"] not in roles:
            raise AnnotationError(
                f"{where}, turn {turn_no}: unknown role {turn['from']!r}; expected one of {', '.join(roles)}"
            )
        messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise AnnotationError(f"{where}: no assistant turn to learn from")
    return messages


def place_visuals(where: str, messages: list[dict[str, str]], images: list[str], videos: list[str],
                  inline: bool) -> None:
    """Write ``images`` and ``videos`` (span names) where their ``<image>`` / ``<video>`` placeholders stand.

    A record with videos and neither images nor ``<video>`` placeholders takes ``<image>`` as the videos'
    placeholder (LLaVA-Video's data: its video records say ``<image>``). ``inline``: the span alone in place of
    the placeholder, the text around it kept (Qwen2-VL's chat template); otherwise ``Picture n: <img>…</img>\\n``
    (Qwen-VL) and ``Video n: <video>…</video>\\n``, each placeholder's newline taken, pictures and videos numbered
    apart as Qwen2-VL's template numbers them (its ``add_vision_id``). A kind with no placeholder goes before the
    first user turn (pictures, then videos); any other count than 0 or one per item is an AnnotationError.
    """
    def count(tag: str) -> int:
        return sum(m["content"].count(tag) for m in messages)

    kinds = {"<image>": ("image", images)} if images else {}
    if videos:
        kinds["<video>" if images or count("<video>") else "<image>"] = ("video", videos)
    spans, unplaced = {}, []
    for tag, (kind, items) in kinds.items():
        found = count(tag)
        if found not in (0, len(items)):
            raise AnnotationError(f"{where}: {found} {tag} placeholders for {len(items)} {kind}s")
        spans[tag] = iter([_visual(kind, n, item, inline) for n, item in enumerate(items, 1)])
        if not found:
            unplaced.append(spans[tag])
    if not spans:
        return
    placeholder = re.compile(f"({'|'.join(spans)})(\n?)")
    for message in messages:
        message["content"] = placeholder.sub(lambda m: next(spans[m[1]]) + (m[2] if inline else ""), message["content"])
    if unplaced:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise AnnotationError(f"{where}: an image or video but no user turn to hold it")
        first_user["content"] = "".join(itertools.chain(*unplaced)) + first_user["content"]


def _visual(kind: str, n: int, name: str, inline: bool) -> str:
    if kind == "image":
        return image_reference(name) if inline else pictures([name], n)
    return video_reference(name) if inline else f"Video {n}: {video_reference(name)}\n"


@registry.register("builder", "qwen_vl_conversation")
class QwenVLConversationBuilder:
    """Qwen-VL's fine-tuning JSON: ``[{"id", "conversations": [{"from": "user"|"assistant", "value"}]}]``.

    Images are referenced inline as ``Picture n: <img>path</img>``; paths are relative to ``image_root``.
    """

    roles = {role: role for role in ROLES}

    def __init__(self, ann_path: str | list[str], image_root: str = "", bad_boxes: Literal["skip", "error"] = "skip") -> None:
        self.ann_paths = as_paths(ann_path)
        self.image_root = image_root
        self.bad_boxes = bad_boxes

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        messages = _conversations(path, index, record, self.roles)
        return {"id": str(record.get("id", index)), "messages": messages}

    def build(self) -> RecordDataset:
        """Read and validate every record now, so a bad file fails at start.

        A record whose ``<box>``/``<quad>`` text is malformed, outside [0, 1000) or inverted is never
        trained as written: it is skipped and counted (one WARNING), or with ``bad_boxes: error`` fails
        the build naming the record.
        """
        records, skips, total = [], SkipCounter("bad_box"), 0
        for path in self.ann_paths:
            for index, record in enumerate(read_annotations(path)):
                converted = self.convert(path, index, record)
                total += 1
                problems = [p for m in converted["messages"] for p in box_problems(m["content"])]
                if not problems:
                    records.append(converted)
                elif self.bad_boxes == "error":
                    raise AnnotationError(f"{describe_record(path, index, record)}: {'; '.join(problems)}")
                else:
                    skips.skip(describe_record(path, index, record), "; ".join(problems))
        skips.warn(type(self).registry_name, total, "with a malformed, out-of-range or inverted box")
        return RecordDataset(records, self.image_root, skips.entries)


def llava_videos(where: str, value: Any) -> list[str | list[str]]:
    """A LLaVA-style record's ``video``: one path (a file or a directory of frames); a list of frame images
    (by their suffix, :data:`~lavis.processors.native_video.FRAME_SUFFIXES`) is one video (LLaVA-Video's
    frames); any other list holds one video per entry, a path or a list of frames (qwen-vl-finetune's
    several videos)."""
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        frames = [isinstance(v, str) and v.lower().endswith(FRAME_SUFFIXES) for v in value]
        if all(frames):
            return [value]
        if not any(frames):
            return value
    raise AnnotationError(f"{where}: 'video' must be a path, a list of frame images or a list of videos (paths or "
                          f"frame lists), not both kinds in one list; got {str(value)[:80]}")


@registry.register("builder", "llava_conversation")
class LLaVAConversationBuilder(QwenVLConversationBuilder):
    """LLaVA's JSON: ``{"id", "image", "video", "conversations": [{"from": "human"|"gpt", "value": "<image>\\n…"}]}``.

    ``image_format``: ``qwen_vl`` writes each ``<image>`` placeholder (and the newline after it) as
    ``Picture n: <img>path</img>\\n``, as Qwen-VL does; ``inline`` writes the image alone in its place,
    ``<img>path</img>``, the text around it kept, as Qwen2-VL / Qwen2.5-VL's fine-tuning code does (its
    ``<|vision_start|>…<|vision_end|>``). ``image`` may be one path or a list; a record with an image but
    no placeholder gets it before the first turn.
    ``video`` (:func:`llava_videos`): one path, a file or a directory of frames (LLaVA-Video-178K,
    qwen-vl-finetune), a list of frame files, or a list of videos; its placeholder is ``<video>``
    (qwen-vl-finetune) or, in a record without images, ``<image>`` (LLaVA-Video); written as
    ``Video n: <video>…</video>\\n`` or inline (:func:`place_visuals`).
    A text-only record keeps a literal ``<image>`` as text, and an opening ``gpt`` turn is dropped (both
    as LLaVA's own preprocessing does).
    """

    roles = {"human": "user", "gpt": "assistant", "system": "system"}

    def __init__(self, ann_path: str | list[str], image_root: str = "", bad_boxes: Literal["skip", "error"] = "skip",
                 image_format: Literal["qwen_vl", "inline"] = "qwen_vl") -> None:
        super().__init__(ann_path, image_root, bad_boxes)
        if image_format not in ("qwen_vl", "inline"):
            raise ValueError(f"llava_conversation: image_format must be qwen_vl or inline, got {image_format!r}")
        self.image_format = image_format

    def build(self) -> RecordDataset:
        """As :meth:`QwenVLConversationBuilder.build`; a first turn by ``gpt`` (ShareGPT exports start so)
        is dropped, as LLaVA's own preprocessing does, and counted in one WARNING."""
        self.dropped_first_turns: list[str] = []
        data = super().build()
        if self.dropped_first_turns:
            log.warning(
                "llava_conversation: dropped the opening gpt turn of %d records, as LLaVA does (first: %s)",
                len(self.dropped_first_turns), self.dropped_first_turns[0],
            )
        return data

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("from") == "gpt":
            self.dropped_first_turns.append(describe_record(path, index, record))
            record = {**record, "conversations": turns[1:]}
        converted = super().convert(path, index, record)
        where = describe_record(path, index, record)
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        sources: dict[str, dict[str, Any]] = {}
        videos = [video_source(where, v, n, sources) for n, v in enumerate(llava_videos(where, record.get("video")), 1)]
        # LLaVA leaves a text-only record's "<image>" as text; so does this
        place_visuals(where, converted["messages"], images, videos, inline=self.image_format == "inline")
        return {**converted, "videos": sources} if sources else converted


def _listed(where: str, record: dict[str, Any], key: str) -> list[Any]:
    """A record's ``images`` / ``videos`` (ms-swift's): a list, one path, or absent."""
    value = record.get(key) or []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise AnnotationError(f"{where}: '{key}' must be a list of paths, got {type(value).__name__}")
    return value


@registry.register("builder", "qwen2_vl_messages")
class Qwen2VLMessagesBuilder(QwenVLConversationBuilder):
    """The message form of Qwen2-VL's model card (qwen-vl-utils, transformers' chat templates):
    ``{"id"?, "messages": [{"role": "system"|"user"|"assistant", "content": "text" | [part, ...]}]}``, a part
    ``{"type": "text", "text"}``, ``{"type": "image", "image": path}`` or ``{"type": "video", "video": path |
    [frame paths], "fps"?}`` (``path`` / ``url`` for the ``image`` / ``video`` key too; ``file://`` dropped).
    Each image and video is written where it stands, ``<img>path</img>`` / ``<video>…</video>``, parts joined
    as they are, as Qwen2-VL's chat template writes them; a video's ``fps`` as :func:`video_source` reads it.
    ms-swift's form, string contents with ``<image>`` / ``<video>`` placeholders and the record's ``images`` /
    ``videos`` lists, is read too (:func:`place_visuals`, inline). Other per-item keys (``max_pixels``,
    ``resized_height``, ...) are not read (``model.image_processor`` / ``video_processor`` decide): one WARNING.
    """

    part_keys = {"type", "text", "image", "video", "path", "url", "fps"}

    def build(self) -> RecordDataset:
        self.unread_keys: set[str] = set()
        data = super().build()
        if self.unread_keys:
            log.warning("qwen2_vl_messages: per-item keys %s are not read; the model's image_processor / "
                        "video_processor settings apply", ", ".join(sorted(self.unread_keys)))
        return data

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        where = describe_record(path, index, record)
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise AnnotationError(f"{where}: expected an object with a 'messages' list")
        sources: dict[str, dict[str, Any]] = {}
        numbers, messages = itertools.count(1), []
        for turn_no, turn in enumerate(record["messages"]):
            at = f"{where}, message {turn_no}"
            content = turn.get("content") if isinstance(turn, dict) else None
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or turn.get("role") not in ROLES:
                raise AnnotationError(f"{at}: expected {{'role': {'|'.join(ROLES)}, 'content': str or a list of parts}}")
            text = "".join(self.part(at, part, sources, numbers) for part in parts)
            messages.append({"role": turn["role"], "content": text})
        if not any(m["role"] == "assistant" for m in messages):
            raise AnnotationError(f"{where}: no assistant turn to learn from")
        images = [span_path(where, p, "an image path") for p in _listed(where, record, "images")]
        videos = [video_source(where, v, next(numbers), sources) for v in _listed(where, record, "videos")]
        place_visuals(where, messages, images, videos, inline=True)
        converted = {"id": str(record.get("id", index)), "messages": messages}
        return {**converted, "videos": sources} if sources else converted

    def part(self, at: str, part: Any, sources: dict[str, dict[str, Any]], numbers: Iterator[int]) -> str:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            return part["text"]
        if kind in ("image", "video"):
            self.unread_keys.update(set(part) - self.part_keys)
            value = next((part[key] for key in (kind, "path", "url") if key in part), None)
            if kind == "image":
                return image_reference(span_path(at, value, "the image path"))
            return video_reference(video_source(at, value, next(numbers), sources, part.get("fps")))
        raise AnnotationError(f"{at}: a content part is {{'type': 'text', 'text'}}, {{'type': 'image', 'image'}} or "
                              f"{{'type': 'video', 'video'}}, got {str(part)[:80]}")
