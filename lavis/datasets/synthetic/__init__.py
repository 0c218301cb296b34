"""Embedded default data: a deterministic synthetic world and a small tokenizer.

The tokenizer names are imported lazily (``tokenizers`` is only needed for them).
"""

from .world import (
    ANSWER_VOCAB,
    COLOURS,
    DEFAULT_SIZES,
    POSITIONS,
    QUESTION_TEMPLATES,
    SHAPES,
    Obj,
    Scene,
    box_text,
    describe,
    ensure_world,
    generate_scenes,
    grounding_text,
    iou,
    load_scenes,
    parse_boxes,
    ref_phrase,
    render,
)

_TOKENIZER_NAMES = ("EMBEDDED_TOKENIZER_PATH", "SPECIAL_TOKENS", "build_tokenizer")


def __getattr__(name: str):
    if name in _TOKENIZER_NAMES:
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANSWER_VOCAB",
    "COLOURS",
    "DEFAULT_SIZES",
    "EMBEDDED_TOKENIZER_PATH",
    "POSITIONS",
    "QUESTION_TEMPLATES",
    "SHAPES",
    "SPECIAL_TOKENS",
    "Obj",
    "Scene",
    "box_text",
    "build_tokenizer",
    "describe",
    "ensure_world",
    "generate_scenes",
    "grounding_text",
    "iou",
    "load_scenes",
    "parse_boxes",
    "ref_phrase",
    "render",
]
