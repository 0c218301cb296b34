"""Multiple-choice benchmarks read from the files their authors release: ScienceQA-IMG, MMBench,
SEED-Bench (image), AI2D. Each gives records of the ``multiple_choice`` builder's shape (question,
hint, lettered choices, answer letter; see :func:`mc_record`), scored by the ``multiple_choice``
task as Qwen-VL scores ScienceQA, MMBench and SEED-Bench: the option letter of lowest loss.

A missing file is an error naming where the benchmark's authors publish it (``released_at``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    ReleasedBenchmark,
    SplitFilter,
    describe_record,
    image_path,
    keyed_entries,
    plain_name,
    read_json,
    read_text,
    require_dict,
    require_str,
)
from lavis.datasets.builders.multiple_choice import (
    LETTERS,
    answer_letter,
    choice_texts,
    mc_record,
)


class ReleasedMCBuilder(ReleasedBenchmark):
    """Base of the builders of released multiple-choice files: ``ann_path`` and ``image_root``; a
    subclass names where the benchmark is published and turns its file into records."""

    def __init__(self, ann_path: str, image_root: str = "") -> None:
        self.ann_path = ann_path
        self.image_root = image_root

    def build(self) -> RecordDataset:
        self.require_release(self.ann_path)
        records = list(self.records(self.ann_path))
        if not records:
            raise AnnotationError(f"{self.ann_path}: no {self.registry_name} questions kept")
        return RecordDataset(records, self.image_root)

    def records(self, path: str) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


@registry.register("builder", "scienceqa")
class ScienceQABuilder(ReleasedMCBuilder):
    """ScienceQA (``problems.json``: ``{pid: {"question", "choices", "answer": index, "hint", "image":
    "image.png" | null, "subject", "split", ...}}``); images ``{split}/{pid}/{image}`` under
    ``image_root`` (the release's images/). ``split`` (default test) filters problems;
    ``image_only`` keeps those with an image: ScienceQA-IMG, the subset Qwen-VL reports. Accuracy is
    also given per ``subject`` (natural, social, language science)."""

    released_at = "https://scienceqa.github.io (problems.json and images/ of the data release)"

    def __init__(self, ann_path: str, image_root: str = "", split: str | None = "test", image_only: bool = True) -> None:
        super().__init__(ann_path, image_root)
        self.splits = SplitFilter(split)
        self.image_only = image_only

    def records(self, path: str) -> Iterator[dict[str, Any]]:
        splits = self.splits.reading(path)
        problems = keyed_entries(path, read_json(path), "a ScienceQA problems.json", "question", "choices", "answer", "split")
        for pid, where, problem in problems:
            if not splits.keeps(problem["split"]) or (self.image_only and not problem.get("image")):
                continue
            choices = choice_texts(where, problem["choices"])
            image = image_path(where, f"{problem['split']}/{pid}/{problem['image']}") if problem.get("image") else None
            yield mc_record(str(pid), image, require_str(where, problem["question"], "'question'"), choices,
                            answer_letter(where, problem["answer"], len(choices)), problem.get("hint"),
                            category=problem.get("subject"))
        splits.check()


# What pandas reads as a missing cell (read_csv's default na_values): the official MMBench readers
# (Qwen-VL's converter, OpenCompass) read the TSV with pandas, so an option spelled like this is absent.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
CIRCULAR_OFFSET = 1_000_000  # MMBench's circular copies of question i have index i + k * 1e6


@registry.register("builder", "mmbench")
class MMBenchBuilder(ReleasedMCBuilder):
    """MMBench (``mmbench_dev_20230712.tsv`` or ``MMBench_DEV_EN.tsv``): tab-separated ``index,
    question, hint, A, B, C, D, answer, category, l2-category, image`` with the image as base64.

    Images are written once, byte for byte, to ``image_dir`` (default: ``<tsv name>_images/`` beside
    the file) as ``{index}.jpg`` / ``.png``. ``circular`` (default): circular evaluation, as the
    official evaluator and Qwen-VL's ``mmbench_evaluation.py`` score MMBench: a question counts only
    if every rotation of its options is answered right. The 2023-07-12 files hold the rotations
    (index + k * 1e6); for a file without them they are made here (options shifted by k, k < n).
    ``circular: false`` keeps the original rows only. Accuracy is also given per ``l2-category``.
    """

    released_at = "https://github.com/open-compass/MMBench (mmbench_dev_20230712.tsv)"

    def __init__(self, ann_path: str, image_dir: str | None = None, circular: bool = True) -> None:
        super().__init__(ann_path)
        self.image_dir = Path(image_dir) if image_dir else Path(ann_path).with_name(Path(plain_name(ann_path)).stem + "_images")
        self.circular = circular

    def build(self) -> RecordDataset:
        dataset = super().build()
        dataset.image_root = str(self.image_dir)
        return dataset

    def records(self, path: str) -> Iterator[dict[str, Any]]:
        rows = read_tsv(path, required=("index", "question", "A", "B", "answer", "image"))
        images = {row["index"]: row["image"] for row in rows}
        has_rotations = any(int(row["index"]) >= CIRCULAR_OFFSET for row in rows)
        for line, row in enumerate(rows, 2):
            where = f"{path}: line {line} (index {row['index']})"
            index = int(row["index"])
            if index >= CIRCULAR_OFFSET and not self.circular:
                continue
            choices = [row[letter] for letter in LETTERS[:4] if row.get(letter) is not None and row[letter] not in PANDAS_NA]
            image = self._write_image(where, row["index"], images)
            question = require_str(where, row["question"], "'question'")
            hint = row.get("hint") if row.get("hint") not in PANDAS_NA else None
            category = row.get("l2-category") or row.get("category")
            answer = LETTERS.index(answer_letter(where, row["answer"], len(choices)))
            group = str(index % CIRCULAR_OFFSET) if self.circular else None
            rotations = range(len(choices)) if self.circular and not has_rotations else range(1)
            for k in rotations:
                rotated = choices[k:] + choices[:k]
                yield mc_record(str(index + k * CIRCULAR_OFFSET), image, question, rotated,
                                LETTERS[(answer - k) % len(choices)], hint, category, group)

    def _write_image(self, where: str, index: str, images: dict[str, str]) -> str:
        """The row's image file name in ``image_dir``, written on first use (a short cell naming
        another row's index, as later MMBench files do for rotations, shares that row's image)."""
        cell = images[index]
        while len(cell) <= 64 and cell in images and images[cell] != cell:
            index, cell = cell, images[cell]
        try:
            data = base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError):
            raise AnnotationError(f"{where}: the image is not base64 (nor the index of a row)") from None
        name = index + (".png" if data.startswith(b"\x89PNG") else ".jpg")
        target = self.image_dir / name
        if not (target.is_file() and target.stat().st_size == len(data)):
            self.image_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{name}.{os.getpid()}")  # each process its own; the rename is atomic
            partial.write_bytes(data)
            os.replace(partial, target)
        return name


def read_tsv(path: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a tab-separated file with a header (cells as strings; base64 images allowed)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t")  # gzip allowed, as every file
    missing = [key for key in required if key not in (reader.fieldnames or [])]
    if missing:
        raise AnnotationError(f"{path}: not an MMBench TSV: no column {', '.join(missing)} (columns: {reader.fieldnames})")
    rows = list(reader)
    for line, row in enumerate(rows, 2):
        if not row["index"].strip().isdigit():
            raise AnnotationError(f"{path}: line {line}: index {row['index']!r} is not a number")
    return rows


# question_type_id 1-9 are image questions. 10-12 (action recognition, action prediction, procedure understanding)
# are video questions, skipped: their videos are not in SEED-Bench's release (Something-Something v2, EPIC-KITCHENS-100
# and Breakfast, each from its own source) and 11-12 ask about a segment of a long video (its "segment"), which a
# <video> span does not cut. Video multiple choice is read by the multiple_choice builder (MVBench's task JSON).
SEED_IMAGE_TYPES = range(1, 10)


@registry.register("builder", "seed_bench")
class SEEDBenchBuilder(ReleasedMCBuilder):
    """SEED-Bench (``SEED-Bench.json``: ``{"questions": [{"question_id", "question", "choice_a" ..
    "choice_d", "answer": "A", "data_id", "question_type_id"}], "question_type": {name: id}}``): the
    image questions (types 1-9), images ``data_id`` under ``image_root``; the video questions (10-12) are
    left out (see :data:`SEED_IMAGE_TYPES`). Accuracy is also given per question type (SEED-Bench's
    evaluation dimensions)."""

    released_at = "https://huggingface.co/datasets/AILab-CVC/SEED-Bench (SEED-Bench.json, SEED-Bench-image)"

    def records(self, path: str) -> Iterator[dict[str, Any]]:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise AnnotationError(f"{path}: not a SEED-Bench file: expected {{'questions': [...], 'question_type': {{...}}}}")
        type_names = {v: k for k, v in (data.get("question_type") or {}).items()}
        for index, question in enumerate(data["questions"]):
            where = describe_record(path, index, question, "question_id")
            require_dict(where, question, "question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d",
                         "answer", "data_id", "question_type_id")
            if question["question_type_id"] not in SEED_IMAGE_TYPES:
                continue
            choices = choice_texts(where, [question[f"choice_{c}"] for c in "abcd"])
            yield mc_record(str(question["question_id"]), image_path(where, question["data_id"]),
                            require_str(where, question["question"], "'question'"), choices,
                            answer_letter(where, question["answer"], 4),
                            category=type_names.get(question["question_type_id"], str(question["question_type_id"])))


@registry.register("builder", "ai2d")
class AI2DBuilder(ReleasedMCBuilder):
    """AI2D (``ai2d/questions/``: one ``{"imageName": "0.png", "questions": {text: {"answerTexts",
    "correctAnswer": index, "questionId", "abcLabel"}}}`` JSON per diagram): ``ann_path`` is the
    questions directory, ``image_root`` the images directory, and ``test_ids_path`` (the released
    ``ai2d_test_ids.csv``, one diagram id per line) keeps the test diagrams; null keeps all."""

    released_at = "https://prior.allenai.org/projects/diagram-understanding (ai2d-all.zip, ai2d_test_ids.csv)"

    def __init__(self, ann_path: str, image_root: str = "", test_ids_path: str | None = None) -> None:
        super().__init__(ann_path, image_root)
        self.test_ids_path = test_ids_path

    def records(self, path: str) -> Iterator[dict[str, Any]]:
        if not Path(path).is_dir():
            raise AnnotationError(f"{path}: ai2d's ann_path is the release's questions/ directory")
        keep = None
        if self.test_ids_path is not None:
            self.require_release(self.test_ids_path)
            keep = {line.strip().removesuffix(".png") for line in Path(self.test_ids_path).read_text().splitlines() if line.strip()}
        for file in sorted(Path(path).glob("*.json"), key=lambda f: _diagram_order(f.name)):
            diagram = read_json(file)
            require_dict(str(file), diagram, "imageName", "questions")
            if keep is not None and str(diagram["imageName"]).removesuffix(".png") not in keep:
                continue
            image = image_path(str(file), diagram["imageName"])
            for text, question in diagram["questions"].items():
                where = f"{file}: question {text!r}"
                require_dict(where, question, "answerTexts", "correctAnswer", "questionId")
                choices = choice_texts(where, question["answerTexts"])
                yield mc_record(str(question["questionId"]), image, require_str(where, text, "the question"), choices,
                                answer_letter(where, question["correctAnswer"], len(choices)))


def _diagram_order(name: str) -> tuple[int, str]:
    """``10.png.json`` after ``9.png.json``: numeric diagram ids in number order."""
    stem = name.split(".", 1)[0]
    return (int(stem), name) if stem.isdigit() else (sys.maxsize, name)
