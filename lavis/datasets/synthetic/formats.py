"""The synthetic world in the on-disk formats of the real pretraining data sets (DESIGN §8, §11).

:func:`write_formats` reads ``scenes_{split}.json`` of a world and writes, beside it, per split:

``captions_{split}.json``          COCO captions JSON (1-2 captions per image)      -> coco_caption
``vqa_questions_{split}.json``     VQAv2 questions (2 per image) ...
``vqa_annotations_{split}.json``   ... and annotations (10 answers each)             -> vqa (image_pattern
                                   ``images/{split}/{image_id:06d}.png``, image_id = scene index)
``vqa_{split}.jsonl``              the same questions, simple JSONL                   -> vqa
``refs_{split}.json``              one record per object, 1-2 expressions            -> ref_grounding
``grounded_captions_{split}.json`` describe() with each object's phrase grounded    -> grounded_caption
``ocr_{split}.json``               one record per image of ``images_ocr/{split}/``  -> ocr
                                   (1-2 dark words on a light background)

and once: ``text.jsonl``, plain sentences about the world -> text. Every image path is relative
to the world root (the builders' ``image_root``). Deterministic in ``(seed, split)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from lavis.datasets.synthetic.world import (
    COLOUR_NAMES,
    IMAGE_SIZE,
    SHAPES,
    TEXT_QA,
    VQA_TYPES,
    Obj,
    Scene,
    describe,
    load_scenes,
    make_vqa,
    position_phrase,
    ref_phrase,
)

OCR_DIR = "images_ocr"
OCR_WORDS: tuple[str, ...] = (*COLOUR_NAMES, *SHAPES, *"0123456789", *"yes no stop open sun cat dog box map tea".split())
OCR_SCALES = (2, 3, 4)  # bitmap glyphs are 6x11 px; scaled up so that they stay legible at 128 px
VQA_QUESTIONS_PER_IMAGE = 2
VQA_ANSWERS = 10
# Occasional other answers among VQAv2's ten, as human annotators give them; the canonical answer
# always stays the most frequent.
ANSWER_SYNONYMS: dict[str, str] = {
    "1": "one",
    "2": "two",
    "center": "middle",
    "purple": "violet",
    "yes": "yeah",
    "square": "box",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: Obj) -> str:
    """``"a red circle"``: the phrase describe() uses for ``obj``."""
    return f"{_article(obj.colour)} {obj.colour} {obj.shape}"


def _xywh(obj: Obj) -> list[int]:
    x1, y1, x2, y2 = obj.bbox
    return [x1, y1, x2 - x1, y2 - y1]


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False))  # dumps: the C encoder (dump streams in Python)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- captions


def coco_captions(scenes: list[Scene], seed: int, split: str) -> dict[str, Any]:
    """COCO captions JSON; image ``id`` = scene index; a second caption for about half the images."""
    rng = random.Random(f"lavis-synthetic-captions:{split}:{seed}")
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        images.append({"id": i, "file_name": scene.image, "width": scene.width, "height": scene.height})
        captions = [describe(scene)]
        if rng.random() < 0.5:
            if len(scene.objects) > 1:  # the same objects in the other order
                captions.append(describe(Scene(scene.image, scene.width, scene.height, scene.objects[::-1])))
            else:
                captions.append(f"a picture of {describe(scene)}")
        for caption in captions:
            annotations.append({"id": len(annotations), "image_id": i, "caption": caption})
    info = {"description": f"synthetic world captions, {split}", "version": "1.0"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations}


# --------------------------------------------------------------------------- VQA


def vqa_files(scenes: list[Scene], seed: int, split: str) -> tuple[dict, dict, list[dict]]:
    """VQAv2 questions and annotations JSON, and the same questions as simple JSONL records."""
    rng = random.Random(f"lavis-synthetic-vqa:{split}:{seed}")
    questions, annotations, simple = [], [], []
    for i, scene in enumerate(scenes):
        for k, qtype in enumerate(rng.sample(VQA_TYPES, VQA_QUESTIONS_PER_IMAGE)):
            question, answer, _ = make_vqa(rng, scene, qtype)
            qid = i * 1000 + k  # as VQAv2: image id * 1000 + k
            answers = [answer] * VQA_ANSWERS
            if answer in ANSWER_SYNONYMS and rng.random() < 0.3:
                for j in rng.sample(range(VQA_ANSWERS), rng.randint(1, 2)):
                    answers[j] = ANSWER_SYNONYMS[answer]
            questions.append({"question_id": qid, "image_id": i, "question": question})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "question_type": qtype,
                    "answer_type": "number" if qtype == "count" else "yes/no" if qtype == "exists" else "other",
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
                    ],
                }
            )
            simple.append({"id": str(qid), "image": scene.image, "question": question, "answers": answers})
    meta = {"info": {"description": f"synthetic world VQA, {split}"}, "data_type": "synthetic", "data_subtype": split}
    return (
        {**meta, "task_type": "Open-Ended", "questions": questions},
        {**meta, "annotations": annotations},
        simple,
    )


# --------------------------------------------------------------------------- grounding


def ref_records(scenes: list[Scene], seed: int, split: str) -> list[dict[str, Any]]:
    """One ref_grounding record per object: ``the red circle`` and sometimes ``the circle at the top``."""
    rng = random.Random(f"lavis-synthetic-refs:{split}:{seed}")
    records = []
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene.objects):
            sentences = [ref_phrase(obj)]
            if rng.random() < 0.5:
                sentences.append(f"the {obj.shape} {position_phrase(obj.position)}")
            records.append(
                {
                    "id": f"{split}-{i:06d}-{j}",
                    "image": scene.image,
                    "width": scene.width,
                    "height": scene.height,
                    "bbox": _xywh(obj),
                    "sentences": sentences,
                    "split": split,
                }
            )
    return records


def grounded_caption_records(scenes: list[Scene], split: str) -> list[dict[str, Any]]:
    """describe() with each object's noun phrase (``a red circle``) as a region."""
    return [
        {
            "id": f"{split}-{i:06d}",
            "image": scene.image,
            "width": scene.width,
            "height": scene.height,
            "caption": describe(scene),
            "regions": [{"phrase": _noun_phrase(o), "bbox": _xywh(o)} for o in scene.objects],
        }
        for i, scene in enumerate(scenes)
    ]


# --------------------------------------------------------------------------- OCR


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 3) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render_ocr(rng: random.Random, font: ImageFont.ImageFont, size: int = IMAGE_SIZE) -> tuple[Image.Image, list[dict]]:
    """An image with 1-2 words in PIL's bitmap font, scaled up (NEAREST); regions in reading order."""
    background = tuple(rng.randint(215, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    placed: list[tuple[tuple[int, int, int, int], str]] = []
    for _ in range(1 if rng.random() < 0.5 else 2):
        word = rng.choice(OCR_WORDS)
        glyphs = Image.new("L", font.getbbox(word)[2:])  # the word's ink: 255 on the glyphs
        ImageDraw.Draw(glyphs).text((0, 0), word, fill=255, font=font)
        glyphs = glyphs.crop(glyphs.getbbox())  # tight around the ink
        scales = [s for s in OCR_SCALES if glyphs.width * s <= size - 8 and glyphs.height * s <= size // 2 - 4]
        scale = rng.choice(scales)
        glyphs = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.NEAREST)
        for _ in range(20):
            x = rng.randint(2, size - 2 - glyphs.width)
            y = rng.randint(2, size - 2 - glyphs.height)
            box = (x, y, x + glyphs.width, y + glyphs.height)
            if not any(_overlap(box, other) for other, _ in placed):
                break
        else:
            continue  # no room for a second word
        colour = tuple(rng.randint(0, 70) for _ in range(3))
        img.paste(colour, box, glyphs)
        placed.append((box, word))
    placed.sort(key=lambda p: (p[0][1], p[0][0]))
    regions = [{"text": word, "quad": [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]} for (x1, y1, x2, y2), word in placed]
    return img, regions


def write_ocr(out: Path, seed: int, split: str, n: int) -> list[dict[str, Any]]:
    """``n`` OCR images under ``images_ocr/{split}/`` and their records."""
    rng = random.Random(f"lavis-synthetic-ocr:{split}:{seed}")
    font = ImageFont.load_default_imagefont()
    (out / OCR_DIR / split).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img, regions = render_ocr(rng, font)
        image = f"{OCR_DIR}/{split}/{i:06d}.png"
        img.save(out / image, compress_level=1)
        records.append(
            {"id": f"ocr-{split}-{i:06d}", "image": image, "width": img.width, "height": img.height, "ocr": regions}
        )
    return records


# --------------------------------------------------------------------------- text


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


def text_sentences() -> list[str]:
    """Plain sentences about the world: colour mixing, shapes, counting, everyday colours."""
    sentences = []
    for question, answer in TEXT_QA:
        if question.startswith("What colour do you get by mixing "):
            a, b = question.removeprefix("What colour do you get by mixing ").rstrip("?").split(" and ")
            sentences += [f"{a} and {b} make {answer}.", f"mixing {b} and {a} gives {answer}."]
        elif question.startswith("How many sides does "):
            thing = question.removeprefix("How many sides does ").removesuffix(" have?")
            sentences.append(f"{thing} has {answer} sides.")
        elif question.startswith("What colour is "):
            thing = question.removeprefix("What colour is ").rstrip("?")
            sentences.append(f"{thing} is {answer}.")
        else:
            sentences.append(f"{question} {answer}.")
    sentences += [
        "a circle has no corners.",
        "a square has four equal sides and four corners.",
        "a triangle has three corners.",
        f"there are {len(SHAPES)} shapes: {', '.join(SHAPES[:-1])} and {SHAPES[-1]}.",
        f"the colours are {', '.join(COLOUR_NAMES[:-1])} and {COLOUR_NAMES[-1]}.",
        "a picture shows one or two shapes on a light background.",
        "two shapes in a picture never have the same colour.",
    ]
    for a in range(5):
        for b in range(5):
            sentences.append(f"{a} plus {b} is {a + b}.")
    for n in range(1, 8):
        sentences.append(f"after {NUMBER_WORDS[n]} comes {NUMBER_WORDS[n + 1]}.")
    for colour in COLOUR_NAMES:
        for shape in SHAPES:
            sentences.append(f"{_article(colour)} {colour} {shape} is a {shape} whose colour is {colour}.")
    return sentences


# --------------------------------------------------------------------------- all of it


def write_formats(out: Path, seed: int, sizes: dict[str, int]) -> None:
    """Write every format file of the module notes into the world at ``out`` (its scenes must exist)."""
    out = Path(out)
    for split, n in sizes.items():
        scenes = load_scenes(out, split)
        if len(scenes) != n:
            raise ValueError(f"{out}/scenes_{split}.json has {len(scenes)} scenes, expected {n}")
        _write_json(out / f"captions_{split}.json", coco_captions(scenes, seed, split))
        questions, annotations, simple = vqa_files(scenes, seed, split)
        _write_json(out / f"vqa_questions_{split}.json", questions)
        _write_json(out / f"vqa_annotations_{split}.json", annotations)
        _write_jsonl(out / f"vqa_{split}.jsonl", simple)
        _write_json(out / f"refs_{split}.json", ref_records(scenes, seed, split))
        _write_json(out / f"grounded_captions_{split}.json", grounded_caption_records(scenes, split))
        _write_json(out / f"ocr_{split}.json", write_ocr(out, seed, split, n))
    _write_jsonl(out / "text.jsonl", [{"id": str(k), "text": s} for k, s in enumerate(text_sentences())])
