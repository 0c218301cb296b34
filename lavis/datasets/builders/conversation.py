"""Conversation builders: Qwen-VL's fine-tuning JSON and LLaVA's JSON."""

from __future__ import annotations

import logging
import re
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
from lavis.processors.boxes import box_problems
from lavis.processors.conversation import ROLES, image_reference, pictures

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


IMAGE_PLACEHOLDER = re.compile(r"<image>\n?")
INLINE_PLACEHOLDER = re.compile(r"<image>")


@registry.register("builder", "llava_conversation")
class LLaVAConversationBuilder(QwenVLConversationBuilder):
    """LLaVA's JSON: ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": "<image>\\n…"}]}``.

    ``image_format``: ``qwen_vl`` writes each ``<image>`` placeholder (and the newline after it) as
    ``Picture n: <img>path</img>\\n``, as Qwen-VL does; ``inline`` writes the image alone in its place,
    ``<img>path</img>``, the text around it kept, as Qwen2-VL / Qwen2.5-VL's fine-tuning code does (its
    ``<|vision_start|>…<|vision_end|>``). ``image`` may be one path or a list; a record with an image but
    no placeholder gets it before the first turn.
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
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        messages = converted["messages"]
        if not images:  # LLaVA leaves a text-only record's "<image>" as text; so does this
            return converted
        placeholders = sum(len(IMAGE_PLACEHOLDER.findall(m["content"])) for m in messages)
        if placeholders not in (0, len(images)):
            raise AnnotationError(
                f"{describe_record(path, index, record)}: {placeholders} <image> placeholders for {len(images)} images"
            )
        if self.image_format == "inline":
            numbered = iter(image_reference(image) for image in images)
            placeholder = INLINE_PLACEHOLDER
        else:
            numbered = iter(pictures([image], n) for n, image in enumerate(images, 1))
            placeholder = IMAGE_PLACEHOLDER
        for message in messages:
            message["content"] = placeholder.sub(lambda _: next(numbered), message["content"])
        if images and not placeholders:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise AnnotationError(f"{describe_record(path, index, record)}: an image but no human turn to hold it")
            first_user["content"] = "".join(numbered) + first_user["content"]
        return converted
