"""A deterministic synthetic world: coloured shapes at coarse positions.

This is the project's "embedded default" data set.  It is small and simple
enough that a tiny VLM trained on 2 CPU cores for a few minutes learns it
(colour / shape / count / position questions and grounding boxes), yet it is
written in the same on-disk formats as real data:

``root/``
  ``WORLD.json``                marker, written last: version, seed, sizes
  ``images/{split}/{i:06d}.png`` 128x128 RGB images
  ``scenes_{split}.json``       scene metadata (list of ``Scene.to_dict()``)
  ``sft_{split}.json``          Qwen-VL fine-tuning conversations, one record
                                per scene (record ``i`` is built around scene
                                ``i``), each with an extra ``"meta"`` key
  ``llava_{split}.json``        LLaVA-format conversations for the first
                                ``min(n, 200)`` scenes of the split
  ``shards/{split}-NNNNNN.tar`` webdataset caption shards (:func:`write_caption_shards`)
  ``preference_{split}.json``   preference pairs ("is there" answers, captions against
                                hallucinated ones; see :mod:`lavis.datasets.synthetic.preference`)
  captions, VQAv2, RefCOCO-style, grounded-caption, OCR and text files
                                (see :mod:`lavis.datasets.synthetic.formats`)

Coordinates: ``Obj.bbox`` is ``(x1, y1, x2, y2)`` in pixels with ``x2, y2``
exclusive.  In text, boxes use Qwen-VL's ``(x1,y1),(x2,y2)`` where every
coordinate is ``min(int(v * 1000 / size), 999)`` (``size`` = image width for
x, height for y); see :func:`box_text`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lavis.common.registry import registry
from lavis.datasets.shards import write_shards
from lavis.processors.boxes import (  # noqa: F401
    box_text,
    denorm_box,
    iou,
    normalize_coord,
    parse_boxes,
    ref_box_text,
)
from lavis.processors.conversation import pictures

WORLD_VERSION = 3  # 3: preference_{split}.json (the other files as version 2 wrote them)
IMAGE_SIZE = 128
SPLITS = ("train", "val", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "val": 200, "test": 200}
LLAVA_MAX_RECORDS = 200
MARKER = "WORLD.json"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 215, 20),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# 3x3 grid of coarse positions, row-major (row 0 = top, column 0 = left).
POSITION_GRID: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITIONS: tuple[str, ...] = tuple(p for row in POSITION_GRID for p in row)

TWO_OBJECT_PROB = 0.3  # otherwise one object
MIN_SIDE_FRAC, MAX_SIDE_FRAC = 0.25, 0.45
CELL_MARGIN = 3  # object centres stay this many pixels inside their grid cell
OBJECT_GAP = 2  # minimum gap in pixels between two objects' boxes

# Question templates per question type.  Answers are short canonical strings
# drawn from ANSWER_VOCAB so an evaluation can score exact match.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "count": ("How many shapes are there?", "How many objects are in the image?"),
    "position": ("Where is the {colour} {shape}?", "In which part of the image is the {colour} {shape}?"),
    "exists": ("Is there {a} {colour} {shape}?",),
    "grounding": ("Find the {colour} {shape}.", "Give the bounding box of the {colour} {shape}."),
    "caption": ("Describe the image.",),
    "which_picture": ("Which picture shows {a} {colour} {shape}?",),
    "colours_two": ("What colours are the shapes in the two pictures?",),
    "count_two": ("How many shapes are there in the two pictures altogether?",),
}
ANSWER_VOCAB: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "count": ("1", "2"),
    "position": POSITIONS,
    "exists": ("yes", "no"),
    "which_picture": ("Picture 1", "Picture 2"),
    "count_two": ("2", "3", "4"),
    # colours_two: "{colour} and {colour}"; grounding: <ref>..</ref><box>..</box>;
    # caption: describe(scene).
}
# Text-only turns (no image), as found in real mixed SFT data.
TEXT_QA: tuple[tuple[str, str], ...] = (
    ("What colour do you get by mixing red and yellow?", "orange"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour do you get by mixing red and blue?", "purple"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("Which shape has no corners?", "circle"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is fresh grass?", "green"),
    ("What colour is a ripe banana?", "yellow"),
    ("What colour is a ripe tomato?", "red"),
)

# Record mix of sft_{split}.json (one record per scene).
SFT_TASK_WEIGHTS: dict[str, float] = {
    "vqa": 0.45,
    "grounding": 0.20,
    "caption": 0.10,
    "multi_turn": 0.12,
    "multi_image": 0.08,
    "text": 0.05,
}
LLAVA_TASK_WEIGHTS: dict[str, float] = {"vqa": 0.55, "grounding": 0.2, "caption": 0.1, "multi_turn": 0.15}
VQA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "exists")


@dataclass
class Obj:
    """One shape in a scene; ``bbox`` is pixel ``(x1, y1, x2, y2)``, x2/y2 exclusive."""

    shape: str
    colour: str
    bbox: tuple[int, int, int, int]
    position: str  # coarse position word, one of POSITIONS

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.bbox
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass
class Scene:
    """One image: path relative to the world root, size, objects, background colour."""

    image: str
    width: int
    height: int
    objects: list[Obj]
    background: tuple[int, int, int] = (240, 240, 240)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = [Obj(o["shape"], o["colour"], tuple(o["bbox"]), o["position"]) for o in d["objects"]]
        return cls(d["image"], d["width"], d["height"], objs, tuple(d.get("background", (240, 240, 240))))


# --------------------------------------------------------------------------- scenes


def position_word(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """Coarse 3x3 position word ("top left", "center", ...) of a box's centre."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    col = min(int(cx * 3 / width), 2)
    row = min(int(cy * 3 / height), 2)
    return POSITION_GRID[row][col]


def _axis_start(rng: random.Random, cell: int, side: int, size: int) -> int:
    """Pick a box start so that the box centre lies inside grid cell ``cell`` (with margin)."""
    lo, hi = cell * size / 3, (cell + 1) * size / 3
    start_min = max(0, -int(-(lo + CELL_MARGIN - side / 2) // 1))  # ceil
    start_max = min(size - side, int((hi - CELL_MARGIN - side / 2) // 1))
    return rng.randint(start_min, start_max)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place_objects(rng: random.Random, n_obj: int, size: int) -> list[Obj]:
    lo_side, hi_side = round(MIN_SIDE_FRAC * size), round(MAX_SIDE_FRAC * size)
    while True:
        colours = rng.sample(COLOUR_NAMES, n_obj)  # objects differ in colour and in shape,
        shapes = rng.sample(SHAPES, n_obj)  # so "the circle" / "the red object" are unique
        cells = rng.sample(range(9), n_obj)
        for _ in range(20):
            objs = []
            for colour, shape, cell in zip(colours, shapes, cells):
                side = rng.randint(lo_side, hi_side)
                row, col = divmod(cell, 3)
                x1 = _axis_start(rng, col, side, size)
                y1 = _axis_start(rng, row, side, size)
                bbox = (x1, y1, x1 + side, y1 + side)
                objs.append(Obj(shape, colour, bbox, POSITION_GRID[row][col]))
            if all(not _overlap(a.bbox, b.bbox, OBJECT_GAP) for i, a in enumerate(objs) for b in objs[i + 1 :]):
                return objs


def generate_scenes(seed: int, n: int, split: str = "train", size: int = IMAGE_SIZE) -> list[Scene]:
    """Deterministically generate ``n`` scenes; ``(seed, split)`` selects the random stream.

    Images are named ``images/{split}/{i:06d}.png``.  Uses its own ``random.Random``.
    """
    rng = random.Random(f"lavis-synthetic-world:{split}:{seed}")
    scenes = []
    for i in range(n):
        n_obj = 2 if rng.random() < TWO_OBJECT_PROB else 1
        objects = _place_objects(rng, n_obj, size)
        background = tuple(rng.randint(228, 248) for _ in range(3))
        scenes.append(Scene(f"images/{split}/{i:06d}.png", size, size, objects, background))
    return scenes


def render(scene: Scene) -> Image.Image:
    """Draw a scene (plain background, flat-coloured shapes, no antialiasing)."""
    img = Image.new("RGB", (scene.width, scene.height), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.bbox
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=obj.rgb)
        elif obj.shape == "triangle":
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=obj.rgb)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return img


# --------------------------------------------------------------------------- text helpers


def ref_phrase(obj: Obj) -> str:
    """Referring expression, e.g. ``"the red circle"``."""
    return f"the {obj.colour} {obj.shape}"


def grounding_text(obj: Obj, width: int, height: int) -> str:
    """``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``."""
    return ref_box_text(ref_phrase(obj), obj.bbox, width, height)


def position_phrase(position: str) -> str:
    """Position word -> phrase: "in the center", "on the left", "at the top left", ..."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def describe(scene: Scene) -> str:
    """Caption, e.g. ``"a red circle at the top left and an orange square on the right"``."""
    return " and ".join(
        f"{_article(o.colour)} {o.colour} {o.shape} {position_phrase(o.position)}" for o in scene.objects
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- conversations


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_vqa(rng: random.Random, scene: Scene, qtype: str | None = None) -> tuple[str, str, dict]:
    """One single-image question: returns ``(question, answer, turn_meta)``."""
    qtype = qtype or rng.choice(VQA_TYPES)
    template = rng.choice(QUESTION_TEMPLATES[qtype])
    obj = rng.choice(scene.objects)
    if qtype == "colour":
        answer = obj.colour
    elif qtype == "shape":
        answer = obj.shape
    elif qtype == "count":
        answer = str(len(scene.objects))
    elif qtype == "position":
        answer = obj.position
    elif qtype == "exists":
        present = {(o.colour, o.shape) for o in scene.objects}
        if rng.random() < 0.5:
            answer = "yes"
        else:
            absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
            c, s = rng.choice(absent)
            obj = Obj(s, c, (0, 0, 0, 0), "")
            answer = "no"
    else:
        raise ValueError(f"unknown VQA type {qtype!r}")
    question = template.format(a=_article(obj.colour), colour=obj.colour, shape=obj.shape)
    return question, answer, {"task": "vqa", "qtype": qtype, "answer": answer}


def make_grounding(rng: random.Random, scene: Scene) -> tuple[str, str, dict]:
    """Referring-expression grounding: ``Find the red circle.`` -> ``<ref>..</ref><box>..</box>``."""
    obj = rng.choice(scene.objects)
    question = rng.choice(QUESTION_TEMPLATES["grounding"]).format(colour=obj.colour, shape=obj.shape)
    answer = grounding_text(obj, scene.width, scene.height)
    meta = {"task": "grounding", "qtype": "grounding", "answer": answer, "ref": ref_phrase(obj), "bbox": list(obj.bbox)}
    return question, answer, meta


def make_caption(rng: random.Random, scene: Scene) -> tuple[str, str, dict]:
    answer = describe(scene)
    return rng.choice(QUESTION_TEMPLATES["caption"]), answer, {"task": "caption", "qtype": "caption", "answer": answer}


def make_multi_image(rng: random.Random, a: Scene, b: Scene) -> tuple[str, str, dict]:
    """A question about two pictures whose answer needs both."""
    kinds = ["which_picture", "count_two"]
    if len(a.objects) == 1 and len(b.objects) == 1 and a.objects[0].colour != b.objects[0].colour:
        kinds.append("colours_two")
    kind = rng.choice(kinds)
    if kind == "which_picture":
        combos = [{(o.colour, o.shape) for o in s.objects} for s in (a, b)]
        unique = [(k, c) for k in (0, 1) for c in sorted(combos[k] - combos[1 - k])]
        if unique:
            k, (colour, shape) = rng.choice(unique)
            q = QUESTION_TEMPLATES[kind][0].format(a=_article(colour), colour=colour, shape=shape)
            ans = f"Picture {k + 1}"
            return q, ans, {"task": "multi_image", "qtype": kind, "answer": ans}
        kind = "count_two"
    if kind == "colours_two":
        ans = f"{a.objects[0].colour} and {b.objects[0].colour}"
    else:
        ans = str(len(a.objects) + len(b.objects))
    return QUESTION_TEMPLATES[kind][0], ans, {"task": "multi_image", "qtype": kind, "answer": ans}


def _single_image_turns(rng: random.Random, scene: Scene, task: str) -> list[tuple[str, str, dict]]:
    if task == "vqa":
        return [make_vqa(rng, scene)]
    if task == "grounding":
        return [make_grounding(rng, scene)]
    if task == "caption":
        return [make_caption(rng, scene)]
    if task == "multi_turn":
        turns: list[tuple[str, str, dict]] = []
        n_turns = rng.randint(2, 3)
        while len(turns) < n_turns:
            t = make_grounding(rng, scene) if rng.random() < 0.3 else make_vqa(rng, scene)
            if all(t[0] != u[0] for u in turns):
                turns.append(t)
        return turns
    raise ValueError(f"unknown single-image task {task!r}")


def _qwen_record(rid: str, images: list[str], turns: list[tuple[str, str, dict]], meta: dict) -> dict:
    prefix = pictures(images)
    conv = []
    for t, (q, a, _) in enumerate(turns):
        conv.append({"from": "user", "value": (prefix + q) if t == 0 else q})
        conv.append({"from": "assistant", "value": a})
    return {"id": rid, "conversations": conv, "meta": {**meta, "turns": [m for _, _, m in turns]}}


def build_sft_records(scenes: list[Scene], seed: int, split: str) -> list[dict]:
    """Qwen-VL SFT records, one per scene; record ``i`` is built around scene ``i``.

    Mix (see SFT_TASK_WEIGHTS): single-turn VQA, grounding, caption, multi-turn,
    two-picture questions and a few text-only turns.  ``meta`` holds the task,
    the scene indices used and per-turn ``qtype``/``answer`` for scoring.
    """
    rng = random.Random(f"lavis-synthetic-sft:{split}:{seed}")
    records = []
    for i, scene in enumerate(scenes):
        task = _pick(rng, SFT_TASK_WEIGHTS)
        rid = f"{split}-{i:06d}"
        if task == "text":
            q, a = rng.choice(TEXT_QA)
            turns = [(q, a, {"task": "text", "qtype": "text", "answer": a})]
            records.append(_qwen_record(rid, [], turns, {"task": task, "scenes": []}))
        elif task == "multi_image" and len(scenes) > 1:
            j = rng.randrange(len(scenes) - 1)
            j += j >= i  # any other scene of the split
            pair = [i, j] if rng.random() < 0.5 else [j, i]
            a, b = scenes[pair[0]], scenes[pair[1]]
            turns = [make_multi_image(rng, a, b)]
            records.append(_qwen_record(rid, [a.image, b.image], turns, {"task": task, "scenes": pair}))
        else:
            task = "vqa" if task == "multi_image" else task
            turns = _single_image_turns(rng, scene, task)
            records.append(_qwen_record(rid, [scene.image], turns, {"task": task, "scenes": [i]}))
    return records


def build_llava_records(scenes: list[Scene], seed: int, split: str, limit: int = LLAVA_MAX_RECORDS) -> list[dict]:
    """LLaVA-format records (``<image>\\n`` + human/gpt turns) for the first ``limit`` scenes."""
    rng = random.Random(f"lavis-synthetic-llava:{split}:{seed}")
    records = []
    for i, scene in enumerate(scenes[:limit]):
        task = _pick(rng, LLAVA_TASK_WEIGHTS)
        turns = _single_image_turns(rng, scene, task)
        conv = []
        for t, (q, a, _) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
            conv.append({"from": "gpt", "value": a})
        meta = {"task": task, "scenes": [i], "turns": [m for _, _, m in turns]}
        records.append({"id": f"llava-{split}-{i:06d}", "image": scene.image, "conversations": conv, "meta": meta})
    return records


# --------------------------------------------------------------------------- on disk


def _marker_matches(root: Path, expected: dict) -> bool:
    try:
        with open(root / MARKER) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in expected.items())


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def write_scenes(out: Path, scenes: list[Scene], sft_records: list[dict], split: str) -> None:
    """One split's pictures (``images/{split}/``), ``scenes_{split}.json`` and ``sft_{split}.json`` into ``out``."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        render(scene).save(out / scene.image, compress_level=1)
    _write_json(out / f"scenes_{split}.json", [s.to_dict() for s in scenes])
    _write_json(out / f"sft_{split}.json", sft_records)


def write_world(out: Path, seed: int, sizes: dict[str, int]) -> None:
    """Write a complete world into ``out`` (marker last).  Not atomic; see :func:`ensure_world`."""
    for split, n in sizes.items():
        scenes = generate_scenes(seed, n, split)
        write_scenes(out, scenes, build_sft_records(scenes, seed, split), split)
        _write_json(out / f"llava_{split}.json", build_llava_records(scenes, seed, split))
    # Local imports: formats and preference import this module.
    from lavis.datasets.synthetic.formats import write_formats
    from lavis.datasets.synthetic.preference import write_preferences

    write_formats(out, seed, sizes)
    for split in sizes:
        write_caption_shards(out, split)
    write_preferences(out, seed, sizes)
    _write_json(out / MARKER, _marker(seed, sizes))


def write_caption_shards(root: str | Path, split: str = "train", samples_per_shard: int = 200) -> list[str]:
    """Caption shards of a synthetic world: ``root/shards/{split}-000000.tar``, ...

    One sample per scene of ``root/scenes_{split}.json``: key = the image's file stem
    (``000123``), its PNG, and :func:`describe` as caption (read by the ``webdataset_caption``
    builder). Returns the shard paths (``{split}-{000000..N}.tar`` as a brace pattern).
    """
    root = Path(root)
    samples = (
        (Path(scene.image).stem, (root / scene.image).read_bytes(), describe(scene))
        for scene in load_scenes(root, split)
    )
    return write_shards(samples, str(root / "shards" / f"{split}-%06d.tar"), samples_per_shard)


def _marker(seed: int, sizes: dict[str, int]) -> dict:
    return {"version": WORLD_VERSION, "seed": seed, "sizes": dict(sizes), "image_size": IMAGE_SIZE}


@registry.register("synthetic_world", "shapes")
def ensure_world(root: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Make sure a complete world with this version/seed/sizes exists at ``root``; return ``root``.

    ``sizes`` maps split name -> number of scenes; it replaces the default, it is not merged.
    ``None`` accepts an existing world of this version and seed whatever its sizes, and
    otherwise generates ``DEFAULT_SIZES`` (train 2000, val 200, test 200).
    A world is complete when ``WORLD.json`` matches.  Generation happens in a
    temporary sibling directory that is renamed into place, so concurrent
    callers are safe: the loser of the rename discards its copy.  An existing
    world of another version/seed/sizes is replaced; an existing non-empty
    directory that is not a world is never touched (``FileExistsError``).
    Registered as the ``synthetic_world`` generator ``shapes`` (the default of ``synthetic_world``).
    """
    root = Path(root)
    if sizes is None:
        if _marker_matches(root, {"version": WORLD_VERSION, "seed": seed, "image_size": IMAGE_SIZE}):
            return root
        sizes = DEFAULT_SIZES
    sizes = dict(sizes)
    return ensure_generated(root, _marker(seed, sizes), lambda out: write_world(out, seed, sizes))


def ensure_data_set(root: str | Path, identity: dict[str, Any], seed: int, sizes: dict[str, int] | None,
                    default_sizes: dict[str, int], write: Callable[[Path, int, dict[str, int]], None]) -> Path:
    """Make sure the data set named by ``identity`` (its marker's ``world`` and ``version``) exists at ``root``
    with this ``seed`` and ``sizes``; return ``root``. ``sizes=None`` accepts an existing one of this identity
    and seed whatever its sizes, and otherwise generates ``default_sizes``; ``write(out, seed, sizes)`` writes
    a whole one but its marker, which is written here (``{**identity, "seed", "sizes"}``), last, through
    :func:`ensure_generated`."""
    root = Path(root)
    if sizes is None:
        if _marker_matches(root, {**identity, "seed": seed}):
            return root
        sizes = default_sizes
    sizes = dict(sizes)
    marker = {**identity, "seed": seed, "sizes": sizes}

    def write_all(out: Path) -> None:
        write(out, seed, sizes)
        _write_json(out / MARKER, marker)

    return ensure_generated(root, marker, write_all)


def ensure_generated(root: str | Path, expected: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Make sure ``root`` holds a generated data set whose ``WORLD.json`` has the items of ``expected``.

    Otherwise ``write(tmp)`` writes a complete one (its marker, holding ``expected``, last) into a
    temporary sibling directory that is renamed into place: concurrent callers are safe (the loser of
    the rename discards its copy). An existing data set with another marker is replaced; an existing
    non-empty directory without a marker is never touched (``FileExistsError``). Every synthetic data
    set (:func:`ensure_world`, :mod:`lavis.datasets.synthetic.small_objects`) is generated through it.
    """
    root = Path(root)
    for _ in range(3):
        if _marker_matches(root, expected):
            return root
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            write(tmp)
            if root.exists():
                _discard_stale(root, expected)
            try:
                os.rename(tmp, root)
                return root
            except OSError:  # lost the race (root now exists and is non-empty)
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if _marker_matches(root, expected):
        return root
    raise RuntimeError(f"could not create synthetic world at {root}")


def _discard_stale(root: Path, expected: dict) -> None:
    """Move an outdated world (or an empty directory) out of the way and delete it."""
    if _marker_matches(root, expected):
        return
    if (root / MARKER).exists() or (root.is_dir() and not any(root.iterdir())):
        trash = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root, trash)
        except FileNotFoundError:  # someone else moved it already
            return
        shutil.rmtree(trash, ignore_errors=True)
    else:
        raise FileExistsError(f"{root} exists and is not a synthetic world; refusing to overwrite it")


def load_scenes(root: str | Path, split: str) -> list[Scene]:
    """Read ``scenes_{split}.json`` of a world."""
    with open(Path(root) / f"scenes_{split}.json", encoding="utf-8") as f:
        return [Scene.from_dict(d) for d in json.load(f)]
