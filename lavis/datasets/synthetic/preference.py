"""Preference pairs on the shapes world (:mod:`lavis.datasets.synthetic.world`), for a DPO stage after SFT.

They target what the demo's SFT model gets wrong (issue 22): "is there a ...?" questions, its weakest
question type, and captions that name an object the picture does not hold (CHAIR-style hallucination).
One pair per scene, written by :func:`~world.write_world` beside the world's other files:

``preference_{split}.json``  Qwen-VL conversations whose last assistant turn holds ``chosen`` and ``rejected``
                             (the ``qwen_vl_preference`` builder), each with a ``"meta"`` key (below)

=============  =========================================  ===========================  ===========================
kind           question                                   chosen                       rejected
=============  =========================================  ===========================  ===========================
``exists``     ``Is there a red circle?`` (as make_vqa)   the right ``yes`` / ``no``   the other one
``caption``    ``Describe the image.``                    ``describe(scene)``          the caption with one object
                                                                                       that is not in the picture
=============  =========================================  ===========================  ===========================

Half of the "is there" questions ask about an object of the scene (chosen ``yes``), half about an absent one
(chosen ``no``); an absent one shares its colour or its shape with an object of the scene ``NEAR_MISS_PROB`` of
the time (the confusions a model that half-sees the picture makes), otherwise it is any absent combination. The
answers are the SFT data's and the VQA evaluation's words (``yes``/``no``), so that the DPO stage is scored on
the answers it was trained on. A rejected caption swaps one object's colour for one not in the scene
(``swap_colour``), its shape for another (``swap_shape``: the scene's colours are distinct, so the new pair is
absent) or adds an absent object at a free position (``add_object``), written as :func:`~world.describe` writes.

``meta``: ``{"task": "preference", "kind", "qtype" (the VQA type or caption), "scenes": [i], "object": [colour,
shape]`` (the object asked about, or the caption's absent one), ``"present"`` (whether it is in the scene),
``"rejected_kind"`` (captions: how the rejected caption was made)``}``.
The held-out evaluation needs no new file: the "is there" questions are among the world's VQA files
(``question_type: exists``) and the captions' hallucination rate is scored against ``scenes_{split}.json``
(:func:`lavis.tasks.metrics.hallucination_rate`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lavis.datasets.synthetic.world import (
    COLOUR_NAMES,
    POSITIONS,
    QUESTION_TEMPLATES,
    SHAPES,
    Obj,
    Scene,
    _article,
    _pick,
    _write_json,
    describe,
    load_scenes,
)
from lavis.processors.conversation import pictures

PREFERENCE_WEIGHTS: dict[str, float] = {"exists": 0.6, "caption": 0.4}
NEAR_MISS_PROB = 0.75  # an absent object asked about shares its colour or shape with one in the scene
REJECTED_CAPTIONS: tuple[str, ...] = ("swap_colour", "swap_shape", "add_object")


def _absent(scene: Scene) -> list[tuple[str, str]]:
    present = {(o.colour, o.shape) for o in scene.objects}
    return [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]


def exists_pair(rng: random.Random, scene: Scene) -> tuple[str, str, str, dict[str, Any]]:
    """``(question, chosen, rejected, meta)`` of an "is there" question about ``scene``."""
    present = rng.random() < 0.5
    if present:
        obj = rng.choice(scene.objects)
        colour, shape = obj.colour, obj.shape
    else:
        absent = _absent(scene)
        near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in scene.objects)]
        colour, shape = rng.choice(near if near and rng.random() < NEAR_MISS_PROB else absent)
    question = QUESTION_TEMPLATES["exists"][0].format(a=_article(colour), colour=colour, shape=shape)
    chosen, rejected = ("yes", "no") if present else ("no", "yes")
    return question, chosen, rejected, {"kind": "exists", "qtype": "exists", "object": [colour, shape], "present": present}


def caption_pair(rng: random.Random, scene: Scene) -> tuple[str, str, str, dict[str, Any]]:
    """``(question, chosen, rejected, meta)``: the true caption against one naming an object not in ``scene``."""
    kind = rng.choice(REJECTED_CAPTIONS)
    objects = list(scene.objects)
    if kind == "add_object":
        colour, shape = rng.choice(_absent(scene))
        position = rng.choice([p for p in POSITIONS if p not in {o.position for o in objects}])
        objects.insert(rng.randint(0, len(objects)), Obj(shape, colour, (0, 0, 0, 0), position))
    else:
        k = rng.randrange(len(objects))
        obj = objects[k]
        if kind == "swap_colour":
            colour, shape = rng.choice([c for c in COLOUR_NAMES if c not in {o.colour for o in objects}]), obj.shape
        else:  # the scene's colours are distinct: no other object has this colour, so any other shape is absent
            colour, shape = obj.colour, rng.choice([s for s in SHAPES if s != obj.shape])
        objects[k] = Obj(shape, colour, obj.bbox, obj.position)
    rejected = describe(Scene(scene.image, scene.width, scene.height, objects))
    meta = {"kind": "caption", "qtype": "caption", "object": [colour, shape], "present": False, "rejected_kind": kind}
    return QUESTION_TEMPLATES["caption"][0], describe(scene), rejected, meta


def build_preference_records(scenes: list[Scene], seed: int, split: str) -> list[dict[str, Any]]:
    """One ``qwen_vl_preference`` record per scene (record ``i`` about scene ``i``), its kind drawn by
    :data:`PREFERENCE_WEIGHTS`; deterministic in ``(seed, split)``."""
    rng = random.Random(f"lavis-synthetic-preference:{split}:{seed}")
    records = []
    for i, scene in enumerate(scenes):
        make = exists_pair if _pick(rng, PREFERENCE_WEIGHTS) == "exists" else caption_pair
        question, chosen, rejected, meta = make(rng, scene)
        conversations = [{"from": "user", "value": pictures([scene.image]) + question},
                         {"from": "assistant", "chosen": chosen, "rejected": rejected}]
        records.append({"id": f"pref-{split}-{i:06d}", "conversations": conversations,
                        "meta": {"task": "preference", **meta, "scenes": [i]}})
    return records


def write_preferences(out: Path, seed: int, sizes: dict[str, int]) -> None:
    """``preference_{split}.json`` for every split of the world at ``out`` (its scenes must exist)."""
    for split in sizes:
        _write_json(Path(out) / f"preference_{split}.json", build_preference_records(load_scenes(out, split), seed, split))
