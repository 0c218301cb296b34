"""Preference-pair builders (the ``dpo`` task's data): TRL's vision preference format, RLAIF-V's release, and
Qwen-VL conversations whose last assistant turn holds ``chosen`` and ``rejected``.

Each builder converts its records into one form:
``{"id", "messages": [ChatML turns ending with the user turn the answers reply to], "chosen": str, "rejected": str}``,
pictures in the text as the conversation builders write them (``Picture n: <img>path</img>\\n``, or the span
alone with ``image_format: inline``), plus ``image_bytes`` (``{span path: bytes}``, read by
:class:`~lavis.processors.sample.SampleProcessor` before the disk) for a picture given as bytes, and
``ref_chosen_logp`` / ``ref_rejected_logp`` (floats) where the source record holds them: reference
log-probabilities computed once and stored with the data.

One class per format (not one class with a ``format`` key): each format has its own keys (``image_format``
means nothing to Qwen-VL records, whose spans are written already) and its default YAML documents exactly them,
as for the conversation builders. A pair whose answers are identical (after strip) teaches nothing: it is
skipped and counted (``identical_answers``, one WARNING). A malformed record is an :class:`AnnotationError`
naming the file, the record and the key. Files are JSON lists or JSONL (compressed or not); ``.parquet`` files
(as TRL's and RLAIF-V's hub datasets are stored) are read with pyarrow where it is installed.
"""

from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path
from typing import Any, Literal

from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    SkipCounter,
    as_paths,
    describe_record,
    plain_name,
    read_annotations,
    require_dict,
)
from lavis.datasets.builders.conversation import place_visuals
from lavis.datasets.builders.media import span_path
from lavis.processors.conversation import ROLES

REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")
IMAGE_FORMATS = ("qwen_vl", "inline")


def read_records(path: str) -> list[Any]:
    """The records of a JSON list, JSONL or (with pyarrow) parquet file."""
    if not plain_name(path).endswith(".parquet"):
        return read_annotations(path)
    if not Path(path).is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AnnotationError(f"{path}: a parquet file, and pyarrow is not installed (pip install pyarrow, or convert "
                              "it to JSONL: datasets' to_json writes one)") from None
    records = pq.read_table(path).to_pylist()
    if not records:
        raise AnnotationError(f"{path}: the file holds no records")
    return records


def answer_text(where: str, value: Any, key: str) -> str:
    """An answer: a non-blank string, or (TRL's conversational form) one assistant message whose content is
    a string or text parts; anything else is an AnnotationError naming ``key``."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise AnnotationError(f"{where}: '{key}' must be a string or one assistant message "
                                  f"[{{'role': 'assistant', 'content': ...}}], got {str(value)[:80]}")
        value = _content_text(f"{where}, '{key}'", value[0].get("content"), images=False)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{where}: '{key}' must be a non-empty string, got {str(value)[:80]!r}")
    return value


def _content_text(where: str, content: Any, images: bool = True) -> str:
    """A message's content as text: a string, or parts ``{"type": "text", "text"}`` joined as they are, each
    ``{"type": "image"}`` part written as an ``<image>`` placeholder (for :func:`place_visuals`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise AnnotationError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image" and images:
            text.append("<image>")
        else:
            allowed = "{'type': 'text', 'text'}" + (" or {'type': 'image'}" if images else " (no image in an answer)")
            raise AnnotationError(f"{where}: a content part is {allowed}, got {str(part)[:80]}")
    return "".join(text)


def image_entry(where: str, value: Any, fallback_name: str) -> tuple[str, bytes | None]:
    """``(span path, bytes or None)`` of one picture: a path, or a datasets ``Image`` cell ``{"bytes", "path"}``
    (bytes as stored in parquet, or base64 text in JSON); a picture given as bytes without a path is named
    ``fallback_name``."""
    if isinstance(value, str):
        return span_path(where, value, "the image path"), None
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        raise AnnotationError(f"{where}: an image is a path or {{'bytes': ..., 'path': ...}}, got {str(value)[:80]}")
    data = value.get("bytes")
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise AnnotationError(f"{where}: the image's 'bytes' is text but not base64") from None
    elif data is not None and not isinstance(data, (bytes, bytearray)):
        raise AnnotationError(f"{where}: the image's 'bytes' must be bytes or base64 text, got {type(data).__name__}")
    name = span_path(where, value["path"], "the image path") if value.get("path") else fallback_name
    return name, (bytes(data) if data else None)


def reference_logps(where: str, record: dict[str, Any]) -> dict[str, float]:
    """The record's precomputed ``ref_chosen_logp`` / ``ref_rejected_logp``: both (finite numbers) or neither."""
    given = [key for key in REF_KEYS if record.get(key) is not None]
    if not given:
        return {}
    if len(given) == 1:
        raise AnnotationError(f"{where}: '{given[0]}' without '{next(k for k in REF_KEYS if k not in given)}': "
                              "give both reference log-probabilities or neither")
    for key in REF_KEYS:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AnnotationError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return {key: float(record[key]) for key in REF_KEYS}


class PreferenceBuilder:
    """Base of the preference builders: reads ``ann_path`` (a file or a list), converts each record
    (:meth:`convert`) and skips, counted, the pairs whose answers are identical."""

    id_keys: tuple[str, ...] = ("id",)  # the record key that names a record in messages

    def __init__(self, ann_path: str | list[str], image_root: str = "") -> None:
        self.ann_paths = as_paths(ann_path)
        self.image_root = image_root

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        raise NotImplementedError

    def build(self) -> RecordDataset:
        """Read and check every record now, so that a bad file fails at start."""
        records, skips, total = [], SkipCounter("identical_answers"), 0
        for path in self.ann_paths:
            for index, record in enumerate(read_records(path)):
                converted = self.convert(path, index, record)
                total += 1
                if converted["chosen"].strip() == converted["rejected"].strip():
                    skips.skip(describe_record(path, index, record, *self.id_keys),
                               f"chosen and rejected are both {converted['chosen'].strip()[:60]!r}")
                else:
                    records.append(converted)
        skips.warn(type(self).registry_name, total, "whose chosen and rejected answers are identical")
        return RecordDataset(records, self.image_root, skips.entries)

    def pair(self, where: str, record: dict[str, Any], rid: str, messages: list[dict[str, str]],
             chosen: Any, rejected: Any, image_bytes: dict[str, bytes] | None = None) -> dict[str, Any]:
        """The preference record, checked: the messages end with a user turn, the answers are strings."""
        if not messages or messages[-1]["role"] != "user":
            raise AnnotationError(f"{where}: the prompt must end with the user turn the answers reply to "
                                  f"(it ends with {messages[-1]['role'] if messages else 'nothing'})")
        converted = {"id": rid, "messages": messages, "chosen": answer_text(where, chosen, "chosen"),
                     "rejected": answer_text(where, rejected, "rejected"), **reference_logps(where, record)}
        return {**converted, "image_bytes": image_bytes} if image_bytes else converted


class _PicturesInText(PreferenceBuilder):
    """A builder that writes the record's pictures into the text, in Qwen-VL's form or inline."""

    def __init__(self, ann_path: str | list[str], image_root: str = "",
                 image_format: Literal["qwen_vl", "inline"] = "qwen_vl") -> None:
        super().__init__(ann_path, image_root)
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"{self.registry_name}: image_format must be qwen_vl or inline, got {image_format!r}")
        self.image_format = image_format

    def pictures(self, where: str, rid: str, values: list[Any], messages: list[dict[str, str]]) -> dict[str, bytes]:
        """Write the pictures ``values`` where their ``<image>`` placeholders stand (or before the first user
        turn, :func:`place_visuals`); returns the in-memory ones' bytes by span path."""
        images, in_memory = [], {}
        for n, value in enumerate(values, 1):
            name, data = image_entry(f"{where}, image {n}", value, f"{rid}-{n}.jpg")
            images.append(name)
            if data is not None:
                in_memory[name] = data
        if not images and any("<image>" in m["content"] for m in messages):
            raise AnnotationError(f"{where}: an image placeholder or part but no 'images' to fill it")
        place_visuals(where, messages, images, [], inline=self.image_format == "inline")
        return in_memory


@registry.register("builder", "trl_preference")
class TRLPreferenceBuilder(_PicturesInText):
    """TRL's vision preference format, standard or conversational:
    ``{"images": [paths], "prompt": "…" | [{"role", "content": "…" | [{"type": "image"}, {"type": "text", "text"}]}],
    "chosen": "…" | [{"role": "assistant", "content": …}], "rejected": (as chosen)}``.

    ``images`` (or ``image``: one) are paths relative to ``image_root`` or datasets ``Image`` cells
    (``{"bytes", "path"}``); they fill the prompt's ``{"type": "image"}`` parts (or a standard prompt's
    ``<image>`` placeholders) in order, or go before the first user turn where it has none. A standard prompt is
    the user turn. TRL's implicit prompt (no ``prompt``; ``chosen`` and ``rejected`` whole conversations with
    the same turns before their last) is read for conversational records.
    """

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        where = describe_record(path, index, record)
        require_dict(where, record, "chosen", "rejected")
        rid = str(record.get("id", index))
        chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
        if prompt is None:
            if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1
                    and chosen[:-1] == rejected[:-1]):
                raise AnnotationError(f"{where}: missing key 'prompt' (TRL's implicit prompt is read for "
                                      "conversational records: chosen and rejected message lists with the same "
                                      "turns before their last)")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            messages = []
            for turn_no, turn in enumerate(prompt):
                at = f"{where}, 'prompt' message {turn_no}"
                if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                    raise AnnotationError(f"{at}: expected {{'role': {'|'.join(ROLES)}, 'content': ...}}")
                messages.append({"role": turn["role"], "content": _content_text(at, turn.get("content"))})
        else:
            raise AnnotationError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        if record.get("images") is not None and record.get("image") is not None:
            raise AnnotationError(f"{where}: both 'images' and 'image'; give one")
        values = record.get("images") if record.get("images") is not None else record.get("image")
        values = [] if values is None else values if isinstance(values, list) else [values]
        image_bytes = self.pictures(where, rid, values, messages)
        return self.pair(where, record, rid, messages, chosen, rejected, image_bytes)


@registry.register("builder", "rlaif_v_preference")
class RLAIFVPreferenceBuilder(_PicturesInText):
    """RLAIF-V's release (openbmb/RLAIF-V-Dataset; its parquet files, or their JSON/JSONL export):
    ``{"ds_name", "image": {"bytes", "path"} | path, "question", "chosen", "rejected", "origin_dataset",
    "origin_split", "idx", "image_path"}``.

    The picture comes from ``image``'s bytes (kept in memory, under its ``path``, else ``image_path``, else
    ``{idx}.jpg``) or, without bytes, from that path relative to ``image_root``; the question is the user turn.
    The id is ``idx``. ``ds_name``, ``origin_dataset`` and ``origin_split`` (generation metadata) are not read.
    """

    id_keys = ("idx", "id")

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        where = describe_record(path, index, record, *self.id_keys)
        require_dict(where, record, "question", "chosen", "rejected")
        rid = str(record.get("idx", record.get("id", index)))
        image = record.get("image")
        if image is None or (isinstance(image, dict) and not image.get("bytes") and not image.get("path")):
            if record.get("image_path") is None:
                raise AnnotationError(f"{where}: missing key 'image' (bytes or a path) or 'image_path'")
            image = record["image_path"]
        elif isinstance(image, dict) and not image.get("path") and isinstance(record.get("image_path"), str):
            image = {**image, "path": record["image_path"]}
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise AnnotationError(f"{where}: 'question' must be a non-empty string, got {str(question)[:80]!r}")
        messages = [{"role": "user", "content": question}]
        image_bytes = self.pictures(where, rid, [image], messages)
        return self.pair(where, record, rid, messages, record["chosen"], record["rejected"], image_bytes)


@registry.register("builder", "qwen_vl_preference")
class QwenVLPreferenceBuilder(PreferenceBuilder):
    """Qwen-VL's fine-tuning JSON with a preference pair as its last turn:
    ``{"id", "conversations": [{"from": "user", "value": "Picture 1: <img>a.jpg</img>\\n…"}, …,
    {"from": "assistant", "chosen": "…", "rejected": "…"}]}``: the turns before it (``user``/``assistant``/
    ``system``, ``value``) are the prompt, ending with a user turn. Picture paths are relative to ``image_root``.
    The synthetic world's ``preference_{split}.json`` is written in this form.
    """

    def convert(self, path: str, index: int, record: Any) -> dict[str, Any]:
        where = describe_record(path, index, record)
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
            raise AnnotationError(f"{where}: expected an object with a non-empty 'conversations' list")
        *turns, last = record["conversations"]
        messages = []
        for turn_no, turn in enumerate(turns):
            at = f"{where}, turn {turn_no}"
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise AnnotationError(f"{at}: expected {{'from': {'|'.join(ROLES)}, 'value': str}}")
            if "chosen" in turn or "rejected" in turn:
                raise AnnotationError(f"{at}: 'chosen'/'rejected' in a turn before the last; only the last turn "
                                      "holds the preference pair")
            messages.append({"role": turn["from"], "content": turn["value"]})
        at = f"{where}, turn {len(turns)}"
        if not isinstance(last, dict) or last.get("from") != "assistant":
            raise AnnotationError(f"{at}: the last turn must be {{'from': 'assistant', 'chosen', 'rejected'}}")
        require_dict(at, last, "chosen", "rejected")
        return self.pair(where, record, str(record.get("id", index)), messages, last["chosen"], last["rejected"])
