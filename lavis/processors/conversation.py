"""Conversations -> token ids and labels, in Qwen-VL's ChatML with ``<img>`` spans expanded.

Each image reference ``<img>path</img>`` becomes ``<img>`` + N x ``<imgpad>`` + ``</img>`` (N = the
adapter's output length: the same for every image at a fixed image size, the image's own at native
resolution); the model later replaces the pads with the image's N vectors. Each part
is tokenized on its own and concatenated, as Qwen-VL's ``finetune.py`` does, so label boundaries
fall on token boundaries.

Label policies (``run.label_policy``): ``assistant`` supervises each assistant turn's content and its
closing ``<|im_end|>``; ``qwen_vl_finetune`` is the rule of Qwen-VL's ``finetune.py`` ``preprocess``,
which also supervises the ``<|im_start|>``, ``<|im_end|>`` and closing ``\n`` of every turn, system
and user included. Under both, role names, the ``\n`` after them, system/user content and image spans
are never supervised.

Text is read as Qwen-VL's ``finetune.py`` reads it: every special-token string in it is that token.
Conversations from users (chat, the web demo, the API) are encoded with ``allowed_special=IMAGE_SPECIALS``,
as Qwen-VL's chat does: there ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` are plain text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lavis.common.config.schema import LABEL_POLICIES, LabelPolicy
from lavis.processors.errors import SkipSample
from lavis.processors.tokenizer import IMG_END, IMG_START, AllowedSpecial, TextTokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
IMAGE_SPAN = re.compile(rf"{IMG_START}(.*?){IMG_END}", re.S)
VIDEO_START, VIDEO_END = "<video>", "</video>"
# An image or a video where it goes in a text: group 1 an image's path, group 2 a video's.
VISUAL_SPAN = re.compile(rf"{IMG_START}(.*?){IMG_END}|{VIDEO_START}(.*?){VIDEO_END}", re.S)


def image_reference(path: str) -> str:
    """``<img>path</img>``: where an image goes in a text (the one place this form is written)."""
    return f"{IMG_START}{path}{IMG_END}"


def video_reference(path: str) -> str:
    """``<video>path</video>``: where a video goes in a text (a file, or a directory of frames: the video
    processor's to read). Its span is ``<img>`` + the video's pad tokens + ``</img>``."""
    return f"{VIDEO_START}{path}{VIDEO_END}"


def pictures(paths: Iterable[str], first: int = 1) -> str:
    """Qwen-VL's chat form of images: ``Picture n: <img>path</img>\\n`` each, numbered from ``first``."""
    return "".join(f"Picture {n}: {image_reference(path)}\n" for n, path in enumerate(paths, first))


@dataclass
class EncodedText:
    """Token ids, labels (``IGNORE_INDEX`` where unsupervised) and the image paths in order."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    # [start, end) token index of each <img>…</img> span, for truncation.
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    # Each image as the ``images`` function given to the encoder returned it (empty without one).
    processed: list[Any] = field(default_factory=list)

    def extend(self, other: EncodedText) -> EncodedText:
        offset = len(self.input_ids)
        self.input_ids += other.input_ids
        self.labels += other.labels
        self.images += other.images
        self.processed += other.processed
        self.image_spans += [(s + offset, e + offset) for s, e in other.image_spans]
        return self

    def add_tokens(self, ids: list[int], supervised: bool) -> EncodedText:
        self.input_ids += ids
        self.labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        return self


# The images and videos of a text being encoded: (path, video) -> the processed item (``grid``: its patch grid at
# native resolution).
ImageLoader = Callable[[str, bool], Any]


class ConversationEncoder:
    """ChatML formatting, image-span expansion, label masks and span-safe truncation.

    ``num_image_tokens``: the ``<imgpad>`` tokens of every image (a fixed-size model), or a function of
    an image's grid ``(t, h, w)`` (a native-resolution model: the model's ``image_tokens``). The encode
    methods take ``images``, a function that processes an image or a video given its path and whether
    it is a video (``<video>path</video>``): each one of the text is processed as its span is written
    (kept in ``EncodedText.processed``), which a native-resolution model needs to know the span's
    length. A video's span holds the tokenizer's video pads.

    ``allowed_special``: the special tokens read in the turns' content ("all": training data, as
    Qwen-VL's ``finetune.py``); the others' strings there are encoded as plain text. Conversations
    from users take :data:`~lavis.processors.tokenizer.IMAGE_SPECIALS` (see the module notes).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        num_image_tokens: int | Callable[[Sequence[int]], int],
        system_message: str,
        max_len: int,
        label_policy: LabelPolicy = "assistant",
        allowed_special: AllowedSpecial = "all",
    ) -> None:
        if label_policy not in LABEL_POLICIES:
            raise ValueError(f"unknown label_policy {label_policy!r}; expected one of {', '.join(LABEL_POLICIES)}")
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.system_message = system_message
        self.max_len = max_len
        self.label_policy = label_policy
        self.allowed_special = allowed_special
        self._newline = tokenizer.encode("\n")
        self._role_ids = {role: tokenizer.encode(role) for role in ROLES}
        self._image_token_ids = set(tokenizer.image_span_ids)

    def _encode_plain(self, text: str) -> list[int]:
        ids = self.tok.encode(text) if self.allowed_special == "all" else self.tok.encode(text, self.allowed_special)
        if any(i in self._image_token_ids for i in ids):
            # A stray <img>/<imgpad> would desynchronise images and pads in the model.
            raise SkipSample("stray_image_token", f"image token outside an <img>path</img> span in {text!r}")
        return ids

    def _image_tokens(self, path: str, images: ImageLoader | None, out: EncodedText, video: bool) -> int:
        if video and isinstance(self.num_image_tokens, int):
            raise SkipSample("video_unsupported", f"{video_reference(path)}: a fixed-size model takes no video "
                                                  "(a native-resolution vision encoder does: qwen2_vl_vit)")
        if images is not None:
            out.processed.append(images(path, video))
        if isinstance(self.num_image_tokens, int):
            return self.num_image_tokens
        if images is None:
            raise ValueError("a native-resolution model's image spans depend on the images: pass images= to the encoder")
        return self.num_image_tokens(out.processed[-1].grid)

    def encode_text(self, text: str, supervised: bool, images: ImageLoader | None = None) -> EncodedText:
        """Plain text with ``<img>path</img>`` spans; image pads are never supervised."""
        out = EncodedText()
        pos = 0
        for match in VISUAL_SPAN.finditer(text):
            if match.start() > pos:
                out.add_tokens(self._encode_plain(text[pos : match.start()]), supervised)
            start = len(out.input_ids)
            video = match.group(2) is not None
            path = (match.group(2) if video else match.group(1)).strip()
            pads = self._image_tokens(path, images, out, video)
            pad_id = self.tok.vid_pad_id if video else self.tok.img_pad_id
            out.add_tokens([self.tok.img_start_id] + [pad_id] * pads + [self.tok.img_end_id], supervised=False)
            out.images.append(path)
            out.image_spans.append((start, len(out.input_ids)))
            pos = match.end()
        if pos < len(text):
            out.add_tokens(self._encode_plain(text[pos:]), supervised)
        return out

    def encode_turn(self, role: str, content: str, images: ImageLoader | None = None) -> EncodedText:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n``, labelled by the label policy (module notes)."""
        if role not in self._role_ids:
            raise ValueError(f"unknown role '{role}'; expected one of {', '.join(ROLES)}")
        answer = role == "assistant"
        marks = self.label_policy == "qwen_vl_finetune"  # <|im_start|>, <|im_end|>, "\n" of every turn
        out = EncodedText().add_tokens([self.tok.im_start_id], marks)
        out.add_tokens(self._role_ids[role] + self._newline, False)
        out.extend(self.encode_text(content, answer, images))
        out.add_tokens([self.tok.im_end_id], answer or marks)
        return out.add_tokens(self._newline, marks)

    def encode_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                        images: ImageLoader | None = None) -> EncodedText:
        """A whole conversation, with the default system message unless the first turn is a system turn."""
        out = EncodedText()
        if not messages or messages[0]["role"] != "system":
            out.extend(self.encode_turn("system", self.system_message, images))
        for message in messages:
            out.extend(self.encode_turn(message["role"], message["content"], images))
        if add_generation_prompt:
            out.add_tokens([self.tok.im_start_id] + self._role_ids["assistant"] + self._newline, False)
        return out

    def encode_prompt(self, prompt: str, target: str, images: ImageLoader | None = None) -> EncodedText:
        """Pretraining / multi-task format: ``{prompt}{target}<|endoftext|>``, target and end supervised."""
        out = self.encode_text(prompt, supervised=False, images=images)
        out.extend(self.encode_text(target, supervised=True, images=images))
        return out.add_tokens([self.tok.eod_id], supervised=True)

    def truncate(self, enc: EncodedText) -> EncodedText:
        """Cut to ``max_len`` tokens unless that would cut an image span or leave nothing supervised."""
        if len(enc.input_ids) <= self.max_len:
            return enc
        cut = self.max_len
        if any(start < cut < end for start, end in enc.image_spans):
            raise SkipSample("too_long", f"{len(enc.input_ids)} tokens > max_len {self.max_len}, cut inside an image")
        kept_spans = [(s, e) for s, e in enc.image_spans if e <= cut]
        labels = enc.labels[:cut]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("too_long", f"{len(enc.input_ids)} tokens > max_len {self.max_len}, no target left")
        return EncodedText(enc.input_ids[:cut], labels, enc.images[: len(kept_spans)], kept_spans, enc.processed[: len(kept_spans)])
