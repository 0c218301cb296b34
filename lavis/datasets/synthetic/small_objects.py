"""A second synthetic data set, where resolution matters: a few small shapes in wide, tall and square pictures.

The shapes world (:mod:`lavis.datasets.synthetic.world`) draws one or two big shapes on a 128x128
picture: squashed to the tiny preset's 64x64 they stay legible. Here every picture is wide (384x96),
tall (96x384) or square (192x192) and holds 2-4 shapes of side 28-40 px (distinct colours, random shapes),
spread along the picture's long side. The questions need the small
shapes' form and order, which a fixed-size encoder squashing 384x96 to 64x64 (6x along the long side)
blurs into a row of coloured dots, while a native-resolution encoder sees them whole:

=============  ===================================================  ==================
``end``        What colour is the shape at the far right?           a colour
``shape``      What shape is the green one?                         circle/square/triangle
``count_kind`` How many triangles are there?                        0-4
``count``      How many shapes are there?                           2-4 (a control)
=============  ===================================================  ==================

Every training conversation also holds, at a random place among its questions, a dense turn that names
every shape in order (``list``: "List the shapes from left to right." -> "a red circle, a blue triangle and
a green square"): caption-like supervision for a vision side trained from scratch (without it no row of the
ablation learned to look at the pictures). The evaluation asks the four question types only.

``root/`` (the same on-disk formats as the world's, read by the same builders and evaluations):

  ``WORLD.json``                   marker, written last: ``{"world": "small_objects", version, seed, sizes}``
  ``images/{split}/{i:06d}.png``   the pictures
  ``scenes_{split}.json``          scene metadata (``world.Scene.to_dict()``, the world's own class)
  ``sft_{split}.json``             Qwen-VL conversations, one record per picture: 2-3 questions and the
                                   list turn (``qwen_vl_conversation``)
  ``vqa_questions_{split}.json``   VQAv2 questions (2 per picture, of different types) ...
  ``vqa_annotations_{split}.json`` ... and annotations (10 answers each)  -> ``vqa``, image_pattern
                                   ``images/{split}/{image_id:06d}.png`` (image_id = picture index)

Deterministic in ``(seed, split)``; generated on first use by :func:`ensure_small_objects`, registered
as the ``synthetic_world`` generator ``small_objects`` (a dataset's or evaluation's ``synthetic_world``
key), through the world's own marker and regeneration logic (:func:`~world.ensure_generated`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lavis.common.registry import registry
from lavis.datasets.synthetic.world import (
    COLOUR_NAMES,
    SHAPES,
    Obj,
    Scene,
    _article,
    _qwen_record,
    _write_json,
    ensure_data_set,
    write_scenes,
)

NAME = "small_objects"
VERSION = 6
SPLITS = ("train", "val", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 4000, "val": 200, "test": 300}
# (width, height) of each kind of picture, and how often it is drawn.
CANVASES: dict[str, tuple[int, int]] = {"wide": (384, 96), "tall": (96, 384), "square": (192, 192)}
CANVAS_WEIGHTS: dict[str, float] = {"wide": 0.4, "tall": 0.4, "square": 0.2}
MIN_OBJECTS, MAX_OBJECTS = 2, 4
MIN_SIDE, MAX_SIDE = 28, 40  # pixels: sizes vary so that a squashed shape's amount of colour does not tell its form
GAP = 4  # minimum gap in pixels between two shapes along the long side (their spans there never overlap)
EDGE = 3  # shapes stay this many pixels inside the picture
VQA_QUESTIONS_PER_IMAGE = 2
VQA_ANSWERS = 10
MIN_TURNS, MAX_TURNS = 2, 3  # question turns per training conversation (besides the list turn)
LIST_PROB = 1.0  # how often a training conversation holds the list turn (at a random place among its questions)

QUESTION_TYPES: tuple[str, ...] = ("end", "shape", "count_kind", "count")
# The two ends of each axis: x (wide pictures, and some square ones) and y (tall ones, and the other square ones).
END_WORDS: dict[str, tuple[str, str]] = {"x": ("far left", "far right"), "y": ("top", "bottom")}
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "end": ("What colour is the shape at the {end}?", "Which colour does the small shape at the {end} have?"),
    "shape": ("What shape is the {colour} one?", "Which shape is {colour}?"),
    "count_kind": ("How many {shape}s are there?", "How many small {shape}s are there?"),
    "count": ("How many shapes are there?", "How many small shapes are in the picture?"),
    "list": ("List the shapes from {first} to {last}.",),
}
# The words of each axis' direction in the list turn.
LIST_WORDS: dict[str, tuple[str, str]] = {"x": ("left", "right"), "y": ("top", "bottom")}
ANSWER_VOCAB: dict[str, tuple[str, ...]] = {
    "end": COLOUR_NAMES,
    "shape": SHAPES,
    "count_kind": tuple(str(k) for k in range(MAX_OBJECTS + 1)),
    "count": tuple(str(k) for k in range(MIN_OBJECTS, MAX_OBJECTS + 1)),
}


# --------------------------------------------------------------------------- scenes


def _axis(scene: Scene) -> str:
    """The axis along which the scene's shapes are spread (their spans on it are disjoint): the long side,
    or for a square picture the one it was drawn along."""
    if scene.width != scene.height:
        return "x" if scene.width > scene.height else "y"
    spans = sorted((o.bbox[0], o.bbox[2]) for o in scene.objects)
    return "x" if all(a[1] + GAP <= b[0] for a, b in zip(spans, spans[1:])) else "y"


def _spans(rng: random.Random, sides: list[int], length: int) -> list[int]:
    """Starts of ``len(sides)`` disjoint spans (``GAP`` apart, ``EDGE`` inside) along ``length`` pixels, in order."""
    free = length - 2 * EDGE - sum(sides) - GAP * (len(sides) - 1)
    cuts = sorted(rng.randint(0, free) for _ in sides)  # how much of the free room lies before each span
    starts, used = [], EDGE
    for cut, side in zip(cuts, sides):
        starts.append(used + cut)
        used += side + GAP
    return starts


def generate_scenes(seed: int, n: int, split: str = "train") -> list[Scene]:
    """Deterministically generate ``n`` pictures' scenes; ``(seed, split)`` selects the random stream.

    ``Obj.position`` holds the shape's rank along the spread axis (``"1"`` = leftmost or topmost).
    """
    rng = random.Random(f"lavis-small-objects:{split}:{seed}")
    scenes = []
    for i in range(n):
        kind = rng.choices(list(CANVAS_WEIGHTS), weights=list(CANVAS_WEIGHTS.values()))[0]
        width, height = CANVASES[kind]
        axis = ("x" if width > height else "y") if width != height else rng.choice("xy")
        n_obj = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        sides = [rng.randint(MIN_SIDE, MAX_SIDE) for _ in range(n_obj)]
        along, across = (width, height) if axis == "x" else (height, width)
        objects = []
        for rank, (start, side, colour) in enumerate(zip(_spans(rng, sides, along), sides, rng.sample(COLOUR_NAMES, n_obj))):
            other = rng.randint(EDGE, across - EDGE - side)
            x1, y1 = (start, other) if axis == "x" else (other, start)
            objects.append(Obj(rng.choice(SHAPES), colour, (x1, y1, x1 + side, y1 + side), str(rank + 1)))
        background = tuple(rng.randint(228, 248) for _ in range(3))
        scenes.append(Scene(f"images/{split}/{i:06d}.png", width, height, objects, background))
    return scenes


# --------------------------------------------------------------------------- questions


def make_question(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str, dict[str, Any]]:
    """One question of type ``qtype`` about ``scene``: ``(question, answer, turn_meta)``."""
    template = rng.choice(QUESTION_TEMPLATES[qtype])
    if qtype == "end":
        axis = _axis(scene)
        index = 0 if axis == "x" else 1
        ordered = sorted(scene.objects, key=lambda o: o.bbox[index])
        last = rng.random() < 0.5
        question = template.format(end=END_WORDS[axis][last])
        answer = (ordered[-1] if last else ordered[0]).colour
    elif qtype == "shape":
        obj = rng.choice(scene.objects)
        question, answer = template.format(colour=obj.colour), obj.shape
    elif qtype == "count_kind":
        shape = rng.choice(SHAPES)
        question, answer = template.format(shape=shape), str(sum(o.shape == shape for o in scene.objects))
    elif qtype == "count":
        question, answer = template, str(len(scene.objects))
    elif qtype == "list":
        axis = _axis(scene)
        ordered = sorted(scene.objects, key=lambda o: o.bbox[0 if axis == "x" else 1])
        first, last = LIST_WORDS[axis]
        phrases = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in ordered]
        question, answer = template.format(first=first, last=last), ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QUESTION_TYPES)}")
    return question, answer, {"task": "vqa", "qtype": qtype, "answer": answer}


def build_sft_records(scenes: list[Scene], seed: int, split: str) -> list[dict[str, Any]]:
    """Qwen-VL conversations, one per scene (record ``i`` about picture ``i``): 2-3 questions of different types
    and (with probability ``LIST_PROB``) the list turn at a random place among them, so that a first turn is
    mostly a short question, as in the evaluation."""
    rng = random.Random(f"lavis-small-objects-sft:{split}:{seed}")
    records = []
    for i, scene in enumerate(scenes):
        qtypes = rng.sample(QUESTION_TYPES, rng.randint(MIN_TURNS, MAX_TURNS))
        if rng.random() < LIST_PROB:
            qtypes.insert(rng.randint(0, len(qtypes)), "list")
        turns = [make_question(rng, scene, qtype) for qtype in qtypes]
        records.append(_qwen_record(f"{split}-{i:06d}", [scene.image], turns, {"task": "vqa", "scenes": [i]}))
    return records


def vqa_files(scenes: list[Scene], seed: int, split: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """VQAv2 questions and annotations JSON: 2 questions of different types per picture, 10 equal answers each."""
    rng = random.Random(f"lavis-small-objects-vqa:{split}:{seed}")
    questions, annotations = [], []
    for i, scene in enumerate(scenes):
        for k, qtype in enumerate(rng.sample(QUESTION_TYPES, VQA_QUESTIONS_PER_IMAGE)):
            question, answer, _ = make_question(rng, scene, qtype)
            qid = i * 1000 + k  # as VQAv2: image id * 1000 + k
            questions.append({"question_id": qid, "image_id": i, "question": question})
            answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(VQA_ANSWERS)]
            answer_type = "number" if qtype.startswith("count") else "other"
            annotations.append({"question_id": qid, "image_id": i, "question_type": qtype, "answer_type": answer_type,
                                "multiple_choice_answer": answer, "answers": answers})
    meta = {"info": {"description": f"synthetic small objects VQA, {split}"}, "data_type": "synthetic", "data_subtype": split}
    return {**meta, "task_type": "Open-Ended", "questions": questions}, {**meta, "annotations": annotations}


# --------------------------------------------------------------------------- on disk


def write_small_objects(out: Path, seed: int, sizes: dict[str, int]) -> None:
    """Write the whole data set into ``out`` but its marker (:func:`~world.ensure_data_set` writes it last).
    Not atomic; see :func:`ensure_small_objects`."""
    out = Path(out)
    for split, n in sizes.items():
        scenes = generate_scenes(seed, n, split)
        write_scenes(out, scenes, build_sft_records(scenes, seed, split), split)
        questions, annotations = vqa_files(scenes, seed, split)
        _write_json(out / f"vqa_questions_{split}.json", questions)
        _write_json(out / f"vqa_annotations_{split}.json", annotations)


@registry.register("synthetic_world", NAME)
def ensure_small_objects(root: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Make sure the small-objects data set of this version/seed/sizes exists at ``root``; return ``root``.

    As :func:`~lavis.datasets.synthetic.world.ensure_world`: ``sizes=None`` accepts an existing one of this
    version and seed whatever its sizes, and otherwise generates ``DEFAULT_SIZES`` (train 4000, val 200,
    test 300); generation is atomic and safe under concurrent callers; a directory holding another data set
    (e.g. the shapes world) is replaced, one that holds none is never touched (``FileExistsError``).
    """
    return ensure_data_set(root, {"world": NAME, "version": VERSION}, seed, sizes, DEFAULT_SIZES, write_small_objects)
