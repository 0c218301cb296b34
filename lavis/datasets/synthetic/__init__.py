"""Embedded default data: a deterministic synthetic world, a second data set of small objects (where
resolution matters: :mod:`.small_objects`), short videos of the world's shapes (:mod:`.videos`) and a small
tokenizer. Importing the package registers the data sets' generators (registry kind ``synthetic_world``:
``shapes``, ``small_objects``, ``videos``).

The tokenizer names are imported lazily (``tokenizers`` is only needed for them); the special tokens
and the shipped tokenizer's path live in :mod:`lavis.processors.tokenizer`.
"""

from . import small_objects, videos  # noqa: F401  (register the small_objects and videos generators)
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

_TOKENIZER_NAMES = ("build_tokenizer",)


def __getattr__(name: str):
    if name in _TOKENIZER_NAMES:
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANSWER_VOCAB",
    "COLOURS",
    "DEFAULT_SIZES",
    "POSITIONS",
    "QUESTION_TEMPLATES",
    "SHAPES",
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
