"""A synthetic video data set: short clips of the world's shapes moving, changing colour and appearing, and
video QA about them.

Every clip is 4 frames of 112x112 at 2 frames a second (2 s; H.264 in MP4, yuv420p, written with PyAV): 1-3
shapes of the world's colours and forms (:mod:`lavis.datasets.synthetic.world`; distinct forms and colours in a
clip, 24-32 px across). One of them moves left, right, up or down at 12-14 px a frame (36-42 px in the clip), the
others stay where they are. The first shape is there from frame 0, the others appear at frame 1 or 3 (each at its
own frame; the moving one is there from frame 0 or 1); in 60% of the clips one shape turns another colour at
frame 1 or 3, after it appears. Events fall on odd frames, inside one temporal patch of two frames (Qwen2-VL's
ViT: frames 0-1 and 2-3), which then shows the shape before and after, as it shows a step of the motion. Shapes
never overlap. The questions (answers from small vocabularies, each as likely as any other, so that a model that
does not watch the video scores the blind prior at best):

=============  ==================================================  ==================  =====================
``direction``  Which way does the red circle move?                 left/right/up/down  the shape's first
                                                                                       and last frames
``colour``     What colour does the square turn?                   a colour (6)        the change's two
                                                                                       frames
``order``      What colour is the shape that appears first/last?   a colour (6)        the appearances
``count``      How many shapes are there at the end?               1-3 (a control)     the last frame
=============  ==================================================  ==================  =====================

A direction question names the moving shape by colour and form (if it changes colour: "the circle that changes
colour"); a colour question by its form alone (its first colour would rule one answer out); an order question
asks about the first or the last shape to appear, one that keeps its colour. Each question records ``frames``:
the frames (indices) its answer is read from. Every training conversation also holds, at a random place among
its questions, a dense turn (``describe``: "Describe the video." -> "a red circle moves left and turns green,
then a blue square appears"): caption-like supervision for a vision side trained from scratch, as
:mod:`.small_objects` found it needs. The evaluation asks the four question types only.

``root/``:

  ``WORLD.json``                   marker, written last: ``{"world": "videos", version, seed, sizes}``
  ``videos/{split}/{i:06d}.mp4``   the clips
  ``clips_{split}.json``           clip metadata (:meth:`Clip.to_dict`: each shape's box and colour per frame)
  ``sft_{split}.json``             Qwen-VL conversations (``Video 1: <video>path</video>\\n`` before the first
                                   question; ``qwen_vl_conversation``), one record per clip: 2-3 questions and
                                   the describe turn
  ``qwen2vl_{split}.json``         the same conversations in Qwen2-VL's ``qwen-vl-finetune`` form: ``{"video",
                                   "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt",
                                   ...}]}`` (``llava_conversation``)
  ``vqa_{split}.json``             video QA, every applicable question type once per clip: ``{"question_id",
                                   "video", "question", "answers", "question_type", "frames"}`` (the ``vqa``
                                   builder's simple layout)
  ``vqa_questions_{split}.json``   the same questions in VQAv2's layout (``image_id`` = clip index) ...
  ``vqa_annotations_{split}.json`` ... and annotations (10 answers each, ``question_type``)

Deterministic in ``(seed, split)`` (the same bytes on one machine: :data:`ENCODER_OPTIONS`);
generated on first use by :func:`ensure_videos`, registered as the ``synthetic_world`` generator ``videos``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lavis.common.registry import registry
from lavis.datasets.synthetic.world import (
    COLOUR_NAMES,
    SHAPES,
    Obj,
    Scene,
    _article,
    _write_json,
    ensure_data_set,
    render,
)
from lavis.processors.conversation import video_reference

NAME = "videos"
VERSION = 4
SPLITS = ("train", "val", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "val": 200, "test": 200}
WIDTH = HEIGHT = 112  # 4 x 4 merged tokens per temporal patch at 28 px a token
FRAMES, FPS = 4, 2
MIN_OBJECTS, MAX_OBJECTS = 1, 3
MIN_SIDE, MAX_SIDE = 24, 32
MIN_SPEED, MAX_SPEED = 12, 14  # pixels a frame, of the one shape that moves: 36-42 px in the clip
GAP = 2  # minimum gap in pixels between two visible shapes, in every frame
# Events fall on odd frames, inside a temporal patch of the ViT (frames 0-1, 2-3, ...): the patch that holds one
# sees the shape before and after it, as it sees each step of a shape's motion.
LATER_APPEARANCES = (1, 3)  # frames at which the second and third shapes may appear (the first is there at 0)
CHANGE_FRAMES = (1, 3)  # frames at which a shape may take its new colour
CHANGE_PROB = 0.6  # how often a clip holds a shape that changes colour
MIN_TURNS, MAX_TURNS = 2, 3  # question turns per training conversation (besides the describe turn)
VQA_ANSWERS = 10
# libx264's ultrafast preset, single-threaded: the same bytes every time (its veryfast preset is not: a P-frame now
# and then differs between two runs, threads or not)
ENCODER_OPTIONS: dict[str, str] = {"crf": "18", "preset": "ultrafast", "threads": "1"}

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTION_TYPES: tuple[str, ...] = ("direction", "colour", "order", "count")
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "direction": ("Which way does the {name} move?", "In which direction does the {name} move?"),
    "colour": ("What colour does the {shape} turn?", "What colour does the {shape} become?"),
    "first": ("What colour is the shape that appears first?", "Which colour appears first?"),
    "last": ("What colour is the shape that appears last?", "Which colour appears last?"),
    "count": ("How many shapes are there at the end?", "How many shapes are in the last frame?"),
    "describe": ("Describe the video.", "What happens in the video?"),
}
ANSWER_VOCAB: dict[str, tuple[str, ...]] = {
    "direction": tuple(DIRECTIONS),
    "colour": COLOUR_NAMES,
    "order": COLOUR_NAMES,
    "count": tuple(str(k) for k in range(MIN_OBJECTS, MAX_OBJECTS + 1)),
}


# --------------------------------------------------------------------------- clips


@dataclass
class Mover:
    """One shape of a clip: its box at frame ``f`` is ``start`` + ``f * speed`` pixels along ``direction``
    (None: it stays at ``start``), and it is seen from frame ``appear`` on; it has ``colour`` until frame
    ``change`` and ``turns`` from then on (``turns`` None: it keeps its colour)."""

    shape: str
    colour: str
    side: int
    start: tuple[int, int]  # top-left corner at frame 0
    direction: str | None  # None: it stays where it is
    speed: int
    appear: int = 0
    turns: str | None = None
    change: int | None = None

    def box(self, frame: int) -> tuple[int, int, int, int]:
        """Pixel ``(x1, y1, x2, y2)`` (x2/y2 exclusive) at ``frame`` (seen or not)."""
        dx, dy = DIRECTIONS[self.direction] if self.direction is not None else (0, 0)
        x, y = self.start[0] + dx * self.speed * frame, self.start[1] + dy * self.speed * frame
        return x, y, x + self.side, y + self.side

    def visible(self, frame: int) -> bool:
        return frame >= self.appear

    def colour_at(self, frame: int) -> str:
        return self.turns if self.turns is not None and frame >= self.change else self.colour

    def name(self) -> str:
        """How a question names it: ``"red circle"``, or ``"circle that changes colour"``."""
        return f"{self.shape} that changes colour" if self.turns is not None else f"{self.colour} {self.shape}"


@dataclass
class Clip:
    """One video: path relative to the root, frame size, frame count and rate, shapes, background colour."""

    video: str
    width: int
    height: int
    frames: int
    fps: int
    objects: list[Mover]
    background: tuple[int, int, int] = (240, 240, 240)

    def to_dict(self) -> dict[str, Any]:
        """The clip, plus each shape's ``boxes`` and ``colours`` per frame (None where it is not seen yet)."""
        d = asdict(self)
        for obj, od in zip(self.objects, d["objects"]):
            od["boxes"] = [list(obj.box(f)) if obj.visible(f) else None for f in range(self.frames)]
            od["colours"] = [obj.colour_at(f) if obj.visible(f) else None for f in range(self.frames)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Clip:
        keys = ("shape", "colour", "side", "start", "direction", "speed", "appear", "turns", "change")
        objects = [Mover(**{k: tuple(o[k]) if k == "start" else o[k] for k in keys}) for o in d["objects"]]
        return cls(d["video"], d["width"], d["height"], d["frames"], d["fps"], objects, tuple(d["background"]))

    def scene(self, frame: int) -> Scene:
        """The world's :class:`~world.Scene` of one frame (the shapes seen then, in their colour then)."""
        objects = [Obj(o.shape, o.colour_at(frame), o.box(frame), "") for o in self.objects if o.visible(frame)]
        return Scene(self.video, self.width, self.height, objects, self.background)

    def pixels(self) -> np.ndarray:
        """The frames, uint8 ``[frames, height, width, 3]``."""
        return np.stack([np.asarray(render(self.scene(f)), dtype=np.uint8) for f in range(self.frames)])

    def by_appearance(self) -> list[Mover]:
        return sorted(self.objects, key=lambda o: o.appear)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def _start(rng: random.Random, side: int, direction: str | None, speed: int, size: int, axis: int) -> int:
    """A start coordinate on ``axis`` (0: x, 1: y) that keeps the shape inside ``size`` pixels in every frame."""
    travel = DIRECTIONS[direction][axis] * speed * (FRAMES - 1) if direction is not None else 0
    lo, hi = max(0, -travel), size - side - max(0, travel)
    return rng.randint(lo, hi)


def _place(rng: random.Random, movers: list[Mover]) -> bool:
    """Give ``movers`` starts, each inside the frame throughout, none overlapping another while both are seen;
    False when 50 tries found none."""
    for _ in range(50):
        for m in movers:
            m.start = (_start(rng, m.side, m.direction, m.speed, WIDTH, 0), _start(rng, m.side, m.direction, m.speed, HEIGHT, 1))
        if all(not _overlap(a.box(f), b.box(f)) for f in range(FRAMES) for i, a in enumerate(movers)
               for b in movers[i + 1:] if a.visible(f) and b.visible(f)):
            return True
    return False


def make_clip(rng: random.Random, video: str) -> Clip:
    """One random clip: 1-3 shapes, one of those there from frame 0 or 1 moving, later ones appearing, maybe one
    changing colour."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)  # drawn once: a count that is harder to place is not drawn less often
    while True:
        shapes = rng.sample(SHAPES, n)
        appears = [0, *sorted(rng.sample(LATER_APPEARANCES, n - 1))]
        can_change = [k for k in range(n) if appears[k] < CHANGE_FRAMES[-1]]
        changer = rng.choice(can_change) if rng.random() < CHANGE_PROB else None
        # colours: the changer's new one uniform over all, its first one and the others' distinct from it and each other
        turns = rng.choice(COLOUR_NAMES) if changer is not None else None
        colours = rng.sample([c for c in COLOUR_NAMES if c != turns], n)
        moving = rng.choice([k for k in range(n) if appears[k] <= 1])  # seen (nearly) all along
        movers = [Mover(shapes[k], colours[k], rng.randint(MIN_SIDE, MAX_SIDE), (0, 0), None, 0, appears[k])
                  for k in range(n)]
        movers[moving].direction, movers[moving].speed = rng.choice(list(DIRECTIONS)), rng.randint(MIN_SPEED, MAX_SPEED)
        if changer is not None:
            m = movers[changer]
            m.turns, m.change = turns, rng.choice([f for f in CHANGE_FRAMES if f > m.appear])
        if _place(rng, movers):
            background = tuple(rng.randint(228, 248) for _ in range(3))
            return Clip(video, WIDTH, HEIGHT, FRAMES, FPS, movers, background)


def generate_clips(seed: int, n: int, split: str = "train") -> list[Clip]:
    """Deterministically generate ``n`` clips; ``(seed, split)`` selects the random stream."""
    rng = random.Random(f"lavis-videos:{split}:{seed}")
    return [make_clip(rng, f"videos/{split}/{i:06d}.mp4") for i in range(n)]


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS) -> Path:
    """``frames`` (uint8 ``[T, H, W, 3]``, H and W even) as an H.264 MP4 (yuv420p) at ``fps`` frames a second."""
    import av  # PyAV: only where a video is written

    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(ENCODER_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


# --------------------------------------------------------------------------- questions


def moving(clip: Clip) -> Mover:
    """The shape that moves."""
    return next(o for o in clip.objects if o.direction is not None)


def applicable(clip: Clip) -> list[str]:
    """The question types that can be asked about ``clip`` (direction and count always)."""
    types = ["direction"]
    if any(o.turns is not None for o in clip.objects):
        types.append("colour")
    if len(clip.objects) > 1:
        types.append("order")
    return [*types, "count"]


def describe(clip: Clip) -> str:
    """What happens, shape by shape in order of appearance: ``"a red circle moves left and turns green, then a
    blue square appears"`` (a shape there from the start that does not move "stays still")."""
    parts = []
    for obj in clip.by_appearance():
        if obj.direction is not None:
            verb = ("appears and moves " if obj.appear else "moves ") + obj.direction
        else:
            verb = "appears" if obj.appear else "stays still"
        turn = f" and turns {obj.turns}" if obj.turns is not None else ""
        parts.append(f"{_article(obj.colour)} {obj.colour} {obj.shape} {verb}{turn}")
    return ", then ".join(parts)


def make_question(rng: random.Random, clip: Clip, qtype: str) -> tuple[str, str, dict[str, Any]]:
    """One question of type ``qtype`` about ``clip``: ``(question, answer, turn_meta)``; the meta's ``frames``
    are the frames the answer is read from."""
    last = clip.frames - 1
    if qtype == "direction":
        obj = moving(clip)
        question = rng.choice(QUESTION_TEMPLATES[qtype]).format(name=obj.name())
        answer, frames = obj.direction, [obj.appear, last]
    elif qtype == "colour":
        obj = next(o for o in clip.objects if o.turns is not None)
        question = rng.choice(QUESTION_TEMPLATES[qtype]).format(shape=obj.shape)
        answer, frames = obj.turns, [obj.change - 1, obj.change]
    elif qtype == "order":  # about the first or the last shape to appear, whichever keeps its colour (or either)
        ordered = clip.by_appearance()
        which = rng.choice([w for w, o in (("first", ordered[0]), ("last", ordered[-1])) if o.turns is None])
        question = rng.choice(QUESTION_TEMPLATES[which])
        answer = (ordered[0] if which == "first" else ordered[-1]).colour
        frames = sorted({f for o in ordered[1:] for f in (o.appear - 1, o.appear)} | {0})
    elif qtype == "count":
        question, answer, frames = rng.choice(QUESTION_TEMPLATES[qtype]), str(len(clip.objects)), [last]
    elif qtype == "describe":
        question, answer, frames = rng.choice(QUESTION_TEMPLATES[qtype]), describe(clip), list(range(clip.frames))
    else:
        raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QUESTION_TYPES)}")
    return question, answer, {"task": "vqa", "qtype": qtype, "answer": answer, "frames": frames}


def conversation_turns(clips: list[Clip], seed: int, split: str) -> list[list[tuple[str, str, dict[str, Any]]]]:
    """Per clip: 2-3 questions of different applicable types (as many as apply, when fewer) and the describe
    turn at a random place among them."""
    rng = random.Random(f"lavis-videos-sft:{split}:{seed}")
    out = []
    for clip in clips:
        types = applicable(clip)
        qtypes = rng.sample(types, min(len(types), rng.randint(MIN_TURNS, MAX_TURNS)))
        qtypes.insert(rng.randint(0, len(qtypes)), "describe")
        out.append([make_question(rng, clip, qtype) for qtype in qtypes])
    return out


def qwen_vl_record(rid: str, clip: Clip, turns: list[tuple[str, str, dict[str, Any]]], index: int) -> dict[str, Any]:
    """A Qwen-VL conversation: ``Video 1: <video>path</video>\\n`` before the first question."""
    conv = []
    for t, (q, a, _) in enumerate(turns):
        prefix = f"Video 1: {video_reference(clip.video)}\n" if t == 0 else ""
        conv += [{"from": "user", "value": prefix + q}, {"from": "assistant", "value": a}]
    return {"id": rid, "conversations": conv, "meta": {"task": "vqa", "clips": [index], "turns": [m for *_, m in turns]}}


def qwen2vl_record(rid: str, clip: Clip, turns: list[tuple[str, str, dict[str, Any]]], index: int) -> dict[str, Any]:
    """The same conversation in Qwen2-VL's ``qwen-vl-finetune`` form: ``video`` and a ``<video>\\n`` placeholder."""
    conv = []
    for t, (q, a, _) in enumerate(turns):
        conv += [{"from": "human", "value": ("<video>\n" + q) if t == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": rid, "video": clip.video, "conversations": conv,
            "meta": {"task": "vqa", "clips": [index], "turns": [m for *_, m in turns]}}


def vqa_files(clips: list[Clip], seed: int, split: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every applicable question type once per clip: the simple-layout records, and VQAv2 questions and
    annotations (10 equal answers each)."""
    rng = random.Random(f"lavis-videos-vqa:{split}:{seed}")
    simple, questions, annotations = [], [], []
    for i, clip in enumerate(clips):
        for k, qtype in enumerate(applicable(clip)):
            question, answer, meta = make_question(rng, clip, qtype)
            qid = i * 1000 + k  # as VQAv2: clip index * 1000 + k
            answer_type = "number" if qtype == "count" else "other"
            simple.append({"question_id": qid, "video": clip.video, "question": question, "answers": [answer] * VQA_ANSWERS,
                           "answer_type": answer_type, "question_type": qtype, "frames": meta["frames"]})
            questions.append({"question_id": qid, "image_id": i, "video": clip.video, "question": question,
                              "frames": meta["frames"]})
            answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(VQA_ANSWERS)]
            annotations.append({"question_id": qid, "image_id": i, "question_type": qtype, "answer_type": answer_type,
                                "multiple_choice_answer": answer, "answers": answers})
    meta = {"info": {"description": f"synthetic video QA, {split}"}, "data_type": "synthetic", "data_subtype": split}
    return simple, {**meta, "task_type": "Open-Ended", "questions": questions}, {**meta, "annotations": annotations}


# --------------------------------------------------------------------------- on disk


def load_clips(root: str | Path, split: str) -> list[Clip]:
    """Read ``clips_{split}.json``."""
    with open(Path(root) / f"clips_{split}.json", encoding="utf-8") as f:
        return [Clip.from_dict(d) for d in json.load(f)]


def write_videos(out: Path, seed: int, sizes: dict[str, int]) -> None:
    """Write the whole data set into ``out`` but its marker (:func:`~world.ensure_data_set` writes it last).
    Not atomic; see :func:`ensure_videos`."""
    out = Path(out)
    for split, n in sizes.items():
        clips = generate_clips(seed, n, split)
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
        for clip in clips:
            write_video(out / clip.video, clip.pixels(), clip.fps)
        _write_json(out / f"clips_{split}.json", [c.to_dict() for c in clips])
        turns = conversation_turns(clips, seed, split)
        ids = [f"{split}-{i:06d}" for i in range(n)]
        _write_json(out / f"sft_{split}.json", [qwen_vl_record(r, c, t, i) for i, (r, c, t) in enumerate(zip(ids, clips, turns))])
        _write_json(out / f"qwen2vl_{split}.json", [qwen2vl_record(r, c, t, i) for i, (r, c, t) in enumerate(zip(ids, clips, turns))])
        simple, questions, annotations = vqa_files(clips, seed, split)
        _write_json(out / f"vqa_{split}.json", simple)
        _write_json(out / f"vqa_questions_{split}.json", questions)
        _write_json(out / f"vqa_annotations_{split}.json", annotations)


@registry.register("synthetic_world", NAME)
def ensure_videos(root: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Make sure the video data set of this version/seed/sizes exists at ``root``; return ``root``.

    As :func:`~lavis.datasets.synthetic.world.ensure_world`: ``sizes=None`` accepts an existing one of this
    version and seed whatever its sizes, and otherwise generates ``DEFAULT_SIZES`` (train 2000, val 200,
    test 200; about 10 s on 2 CPU cores); generation is atomic and safe under concurrent callers; a directory
    holding another data set is replaced, one that holds none is never touched (``FileExistsError``).
    """
    return ensure_data_set(root, {"world": NAME, "version": VERSION}, seed, sizes, DEFAULT_SIZES, write_videos)
