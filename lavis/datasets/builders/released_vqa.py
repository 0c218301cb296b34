"""Question-answering benchmarks read from the files their authors release: TextVQA, GQA, DocVQA,
ChartQA, OCR-VQA. Each gives VQA records (``<img>…</img>{question} Answer:`` + `` {answer}``, and every
reference answer for evaluation), scored by the ``vqa`` task with the benchmark's metric.

A released file is read as it is published; one whose shape is not the benchmark's is an error
naming the file and, with a missing file, where the authors publish it (``released_at``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    ReleasedBenchmark,
    SplitFilter,
    as_paths,
    describe_record,
    image_path,
    keyed_entries,
    read_json,
    require_dict,
    require_str,
)
from lavis.datasets.builders.vqa import answer_texts, choose_answer, vqa_record

# One released question: (record id, image path, question, answers) in the released file's terms.
Question = tuple[str, str, str, list[str]]


class ReleasedQABuilder(ReleasedBenchmark):
    """Base of the builders of released QA files: ``ann_path`` (one or more files) and ``image_root``;
    a subclass names where the files are published and turns the parsed file into questions."""

    def __init__(self, ann_path: str | list[str], image_root: str = "") -> None:
        self.ann_paths = as_paths(ann_path)
        self.image_root = image_root

    def build(self) -> RecordDataset:
        records = []
        for path in self.ann_paths:
            for rid, image, question, answers in self.questions(path, self.read(path)):
                records.append(vqa_record(rid, image, question, answers, choose_answer(rid, answers)))
        return RecordDataset(records, self.image_root)

    def read(self, path: str) -> Any:
        self.require_release(path)
        return read_json(path)

    def questions(self, path: str, data: Any) -> Iterator[Question]:
        raise NotImplementedError

    def entries(self, path: str, data: Any, key: str | None, shape: str) -> list[Any]:
        """``data[key]`` (or ``data`` itself when ``key`` is None) as a list, else an error naming the shape."""
        found = data.get(key) if key is not None and isinstance(data, dict) else data
        if not isinstance(found, list):
            raise AnnotationError(f"{path}: not a {self.registry_name} file: expected {shape}")
        return found


@registry.register("builder", "textvqa")
class TextVQABuilder(ReleasedQABuilder):
    """TextVQA 0.5.1 (``TextVQA_0.5.1_val.json``): ``{"data": [{"question_id", "image_id", "question",
    "answers": [10 strings]}]}``; images ``{image_id}.jpg`` under ``image_root`` (its train_images/)."""

    released_at = "https://textvqa.org/dataset"

    def questions(self, path: str, data: Any) -> Iterator[Question]:
        for index, entry in enumerate(self.entries(path, data, "data", '{"data": [{"question_id", "image_id", "question", "answers"}]}')):
            where = describe_record(path, index, entry, "question_id")
            require_dict(where, entry, "question_id", "image_id", "question", "answers")
            image = image_path(where, f"{entry['image_id']}.jpg")
            question = require_str(where, entry["question"], "'question'")
            yield str(entry["question_id"]), image, question, answer_texts(where, entry["answers"])


@registry.register("builder", "gqa")
class GQABuilder(ReleasedQABuilder):
    """GQA balanced questions (``testdev_balanced_questions.json``): ``{question_id: {"imageId",
    "question", "answer", ...}}``; images ``{imageId}.jpg`` under ``image_root`` (its images/)."""

    released_at = "https://cs.stanford.edu/people/dorarad/gqa/download.html"

    def questions(self, path: str, data: Any) -> Iterator[Question]:
        for qid, where, entry in keyed_entries(path, data, "a GQA questions file", "imageId", "question", "answer"):
            image = image_path(where, f"{entry['imageId']}.jpg")
            yield str(qid), image, require_str(where, entry["question"], "'question'"), [require_str(where, entry["answer"], "'answer'")]


@registry.register("builder", "docvqa")
class DocVQABuilder(ReleasedQABuilder):
    """DocVQA (``val_v1.0.json``): ``{"data": [{"questionId", "question", "image": "documents/…png",
    "answers": [...]}]}``; images relative to ``image_root`` (the split's directory)."""

    released_at = "https://rrc.cvc.uab.es/?ch=17 (Document Visual Question Answering, Task 1)"

    def questions(self, path: str, data: Any) -> Iterator[Question]:
        for index, entry in enumerate(self.entries(path, data, "data", '{"data": [{"questionId", "question", "image", "answers"}]}')):
            where = describe_record(path, index, entry, "questionId")
            require_dict(where, entry, "questionId", "question", "image", "answers")
            image = image_path(where, entry["image"])
            question = require_str(where, entry["question"], "'question'")
            yield str(entry["questionId"]), image, question, answer_texts(where, entry["answers"])


@registry.register("builder", "chartqa")
class ChartQABuilder(ReleasedQABuilder):
    """ChartQA (``test_human.json`` / ``test_augmented.json``): ``[{"imgname", "query", "label"}]``;
    images under ``image_root`` (the split's png/). Record id: the file's stem and the index."""

    released_at = "https://github.com/vis-nlp/ChartQA"

    def questions(self, path: str, data: Any) -> Iterator[Question]:
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for index, entry in enumerate(self.entries(path, data, None, '[{"imgname", "query", "label"}]')):
            where = describe_record(path, index, entry, "imgname")
            require_dict(where, entry, "imgname", "query", "label")
            label = entry["label"] if isinstance(entry["label"], str) else str(entry["label"])
            yield f"{stem}-{index}", image_path(where, entry["imgname"]), require_str(where, entry["query"], "'query'"), [label]


OCRVQA_SPLITS = {1: "train", 2: "val", 3: "test"}  # dataset.json's "split" codes


@registry.register("builder", "ocrvqa")
class OCRVQABuilder(ReleasedQABuilder):
    """OCR-VQA (``dataset.json``): ``{book_id: {"imageURL", "questions": [...], "answers": [...],
    "split": 1 | 2 | 3, ...}}`` (1 train, 2 val, 3 test); one record per question, id
    ``{book_id}-{k}``. Images as its download script saves them, ``{book_id}{extension of imageURL}``,
    under ``image_root`` (its images/). ``split``: the split(s) kept (``"train,val"``; null keeps all)."""

    released_at = "https://ocr-vqa.github.io/"

    def __init__(self, ann_path: str | list[str], image_root: str = "", split: str | None = "test") -> None:
        super().__init__(ann_path, image_root)
        self.splits = SplitFilter(split)
        unknown = [name for name in self.splits.names or () if name not in OCRVQA_SPLITS.values()]
        if unknown:
            raise ConfigError(f"ocrvqa: unknown split {', '.join(unknown)}; OCR-VQA's splits: {', '.join(OCRVQA_SPLITS.values())}")

    def questions(self, path: str, data: Any) -> Iterator[Question]:
        kept = self.splits.reading(path)
        for book, where, entry in keyed_entries(path, data, "an OCR-VQA dataset.json", "imageURL", "questions", "answers", "split"):
            if not kept.keeps(OCRVQA_SPLITS.get(entry["split"], entry["split"])):
                continue
            questions, answers = entry["questions"], entry["answers"]
            if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
                raise AnnotationError(f"{where}: 'questions' and 'answers' must be lists of the same length")
            url = require_str(where, entry["imageURL"], "'imageURL'")
            image = image_path(where, f"{book}{os.path.splitext(url)[1]}")
            for k, (question, answer) in enumerate(zip(questions, answers)):
                yield (f"{book}-{k}", image, require_str(where, question, f"question {k}"),
                       [require_str(where, answer, f"answer {k}")])
        kept.check()
