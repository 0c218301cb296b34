"""Tokenizers with Qwen-VL's special tokens: a Hugging Face tokenizer, or Qwen's tiktoken BPE.

The one home of the special tokens (``SPECIAL_TOKENS``), Qwen's pre-tokenisation pattern
(``QWEN_PATTERN``) and the embedded default tokenizer's file (``EMBEDDED_TOKENIZER_PATH``, written
by ``python -m lavis.datasets.synthetic.tokenizer``).
"""

from __future__ import annotations

import base64
import copy
import os
import re
import unicodedata
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

from lavis.common.registry import registry

# DataLoader workers fork after the tokenizer has run; HF tokenizers' own threads would deadlock.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The embedded default tokenizer (``hf_tokenizer`` with ``path: null``), shipped with the package.
EMBEDDED_TOKENIZER_PATH = Path(__file__).resolve().parents[1] / "assets" / "tokenizer" / "tokenizer.json"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
REF_START, REF_END, BOX_START, BOX_END = "<ref>", "</ref>", "<box>", "</box>"
QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD = "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END, REF_START, REF_END, BOX_START, BOX_END,
    QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD,
)
# A video's pad token: Qwen-VL has none (its models take no video); a tokenizer that has one names it through
# ``hf_tokenizer``'s ``special_tokens`` (Qwen2-VL: ``<|video_pad|>``), else videos take the image pad.
VID_PAD = "<vidpad>"
# Qwen-VL's ``tokenizer.IMAGE_ST``: the only special tokens its chat reads in user, system and history
# text (``make_context`` encodes them with ``allowed_special=set(IMAGE_ST)``); ``<|im_start|>``,
# ``<|im_end|>`` and ``<|endoftext|>`` written there are plain text, so a message cannot end its turn.
IMAGE_SPECIALS = frozenset((REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD))
# What ``encode`` reads as special tokens: "all" (training data, as Qwen-VL's finetune.py) or a set.
AllowedSpecial = Literal["all"] | AbstractSet[str]
# Qwen's pre-tokenisation: cl100k's pattern with each digit its own piece.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class TextTokenizer:
    """Common interface: ``encode``/``decode`` and the ids of the special tokens."""

    def __init__(self) -> None:
        ids = {tok: self.token_id(tok) for tok in SPECIAL_TOKENS}
        self.eod_id = ids[ENDOFTEXT]
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.img_start_id, self.img_end_id, self.img_pad_id = ids[IMG_START], ids[IMG_END], ids[IMG_PAD]
        self.vid_pad_id = self.video_pad_id()
        self.pad_id = self.eod_id
        self.stop_ids = (self.im_end_id, self.eod_id)
        # Only the prompt builds image spans; generated text that held one could not be fed back.
        self.image_span_ids = tuple(dict.fromkeys((self.img_start_id, self.img_end_id, self.img_pad_id, self.vid_pad_id)))
        self.special_ids = frozenset(ids.values()) | {self.vid_pad_id}

    def video_pad_id(self) -> int:
        """The pad token of a video's span: the image pad unless the tokenizer has a video pad of its own."""
        return self.token_id(IMG_PAD)

    def decode_without_specials(self, ids: list[int]) -> str:
        """``decode`` with special tokens left out, as transformers' ``skip_special_tokens=True``."""
        return self.decode([i for i in ids if i not in self.special_ids])

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Token ids of ``text``. The strings of the special tokens in ``allowed_special`` ("all": every
        one) become their single ids; any other special token's string is encoded as the plain text it
        is (tiktoken's ``allowed_special`` with ``disallowed_special=()``, as Qwen's tokenizer does)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


# ``hf_tokenizer``'s ``special_tokens`` for a Qwen2-VL / Qwen2.5-VL tokenizer: the framework's names -> its strings.
QWEN2_VL_SPECIAL_TOKENS = {
    IMG_START: "<|vision_start|>", IMG_END: "<|vision_end|>", IMG_PAD: "<|image_pad|>",
    REF_START: "<|object_ref_start|>", REF_END: "<|object_ref_end|>", BOX_START: "<|box_start|>", BOX_END: "<|box_end|>",
    QUAD_START: "<|quad_start|>", QUAD_END: "<|quad_end|>", VID_PAD: "<|video_pad|>",
}


@registry.register("processor", "hf_tokenizer")
class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer from a local directory or ``tokenizer.json`` (``null``: the embedded one).

    Qwen-VL's special tokens the tokenizer lacks are added (the LLM's vocabulary is resized to match).
    ``special_tokens`` maps the framework's names of them (``<img>``, ``<imgpad>``, ``<box>``, ...) to the
    tokenizer's own strings where they differ (Qwen2-VL: :data:`QWEN2_VL_SPECIAL_TOKENS`): text may
    then use either name (data written with ``<img>path</img>`` and ``<box>`` reads the same), and
    nothing is added for a mapped token.
    """

    def __init__(self, path: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if path is None:
            path = str(EMBEDDED_TOKENIZER_PATH)
        if Path(path).is_file():
            self.hf = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        vocab = self.hf.get_vocab()
        self.names = dict(special_tokens or {})
        unknown = [k for k in self.names if k not in SPECIAL_TOKENS + (VID_PAD,)]
        if unknown:
            raise ValueError(f"model.tokenizer.special_tokens: {unknown} are not the framework's special tokens "
                             f"({', '.join(SPECIAL_TOKENS + (VID_PAD,))})")
        absent = [v for v in self.names.values() if v not in vocab]
        if absent:
            raise ValueError(f"model.tokenizer.special_tokens: {absent} are not tokens of {path}")
        missing = [t for t in SPECIAL_TOKENS if t not in self.names and t not in vocab]
        if missing:
            self.hf.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        # The same tokenizer reading no special token: for text between the allowed ones (its own copy,
        # as the switch is the tokenizer's state and encoding happens in several threads).
        self._literal = copy.deepcopy(self.hf.backend_tokenizer)
        self._literal.encode_special_tokens = True
        self._every_special = frozenset(self.hf.all_special_tokens) | frozenset(self.hf.get_added_vocab()) | frozenset(self.names)
        self._allowed_patterns: dict[frozenset[str], re.Pattern] = {}
        super().__init__()

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        if allowed_special == "all":
            if not self.names:
                return self.hf.encode(text, add_special_tokens=False)
            allowed_special = self._every_special
        allowed = frozenset(allowed_special) | frozenset(self.names[t] for t in allowed_special if t in self.names)
        pattern = self._allowed_patterns.get(allowed)
        if pattern is None:  # longest first, so that a token is never cut by one it starts with
            names = sorted(allowed, key=len, reverse=True)
            pattern = self._allowed_patterns[allowed] = re.compile("|".join(map(re.escape, names)) or r"(?!)")
        ids, pos = [], 0
        for match in pattern.finditer(text):
            ids += self._encode_literal(text[pos : match.start()])
            ids.append(self.token_id(match.group()))
            pos = match.end()
        return ids + self._encode_literal(text[pos:])

    def _encode_literal(self, text: str) -> list[int]:
        return self._literal.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_id(self, token: str) -> int:
        return self.hf.convert_tokens_to_ids(self.names.get(token, token))

    def video_pad_id(self) -> int:
        return self.token_id(VID_PAD) if VID_PAD in self.names else self.img_pad_id

    def __len__(self) -> int:
        return len(self.hf)


@registry.register("processor", "qwen_tiktoken")
class QwenTiktoken(TextTokenizer):
    """Qwen(-VL)'s own BPE from its ``qwen.tiktoken`` file, with Qwen-VL's special-token ids.

    Ids match the released tokenizer: ``<|endoftext|>`` 151643, ``<|im_start|>``, ``<|im_end|>``,
    205 ``<|extra_i|>``, then ``<ref>`` 151851 … ``<imgpad>`` 151859. Text is NFC-normalised before
    encoding, as the released ``tokenization_qwen.py`` does.
    """

    def __init__(self, path: str) -> None:
        import tiktoken

        file = Path(path)
        if file.is_dir():
            file = file / "qwen.tiktoken"
        ranks = {}
        with open(file, "rb") as fh:
            for line in fh:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        names = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)] + list(SPECIAL_TOKENS[3:])
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self.enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        self._specials = specials
        super().__init__()

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def token_id(self, token: str) -> int:
        return self._specials[token]

    def __len__(self) -> int:
        return self.enc.n_vocab
