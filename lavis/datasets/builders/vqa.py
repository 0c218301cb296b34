"""VQA builder: VQAv2's question + annotation files, or a simple JSON/JSONL of image (or video)/question/answers.

Every question becomes Qwen-VL's stage-2 VQA sample (DESIGN §7)::

    prompt  "<img>{path}</img>{question} Answer:"      (a video: "<video>{path}</video>{question} Answer:")
    target  " {answer}"

The answer is ``multiple_choice_answer`` when the record has one, otherwise the most frequent of its
answers (ties: the first in order). A question without any answer fails the build (AnnotationError),
except VQAv2 questions read without annotations (``ann_path: null``, e.g. test-dev): these become
unanswered records (no ``target``, no ``answers``), for evaluation only.
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    as_paths,
    describe_record,
    image_path,
    load_file,
    read_json,
    require_dict,
    require_str,
)
from lavis.datasets.builders.media import media_reference, record_media
from lavis.processors.conversation import image_reference

ANSWER_PROMPT = " Answer:"


def vqa_record(
    rid: str, image: str | None, question: str, answers: list[str], answer: str, answer_type: str | None = None,
    video: str | None = None, videos: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A training sample (target: ``answer``) plus the fields evaluation reads (all human ``answers``,
    and VQAv2's ``answer_type``, yes/no, number or other, when the annotations give it). A question about
    a ``video`` holds it (``"video"``, a ``<video>`` span; a frame list's frames in ``videos``) instead of
    an image."""
    record = {
        "id": rid,
        "prompt": media_reference(image, video) + question + ANSWER_PROMPT,
        "target": f" {answer}",
        **({"video": video} if video is not None else {"image": image}),
        "question": question,
        "answers": answers,
    }
    if answer_type is not None:
        record["answer_type"] = str(answer_type)
    if videos:
        record["videos"] = videos
    return record


def question_record(rid: str, image: str, question: str, question_id: Any) -> dict[str, Any]:
    """A question without answers (VQAv2 test-dev): for evaluation only, so it has no training ``target``
    and no ``answers``; ``question_id`` is kept as the file gives it, for the submission file."""
    return {"id": rid, "prompt": image_reference(image) + question + ANSWER_PROMPT, "image": image,
            "question": question, "question_id": question_id}


def answer_texts(where: str, answers: Any) -> list[str]:
    """``answers`` as strings: a list of strings or of VQAv2's ``{"answer": ...}`` objects, or one string."""
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise AnnotationError(f"{where}: 'answers' must be a list, got {type(answers).__name__}")
    texts = []
    for k, answer in enumerate(answers):
        if isinstance(answer, dict):
            answer = answer.get("answer")
        texts.append(require_str(where, answer, f"answer {k}"))
    return texts


def choose_answer(where: str, answers: list[str], multiple_choice_answer: Any = None) -> str:
    """``multiple_choice_answer`` when given, else the most frequent answer (ties: the first in order)."""
    if multiple_choice_answer is not None:
        return require_str(where, multiple_choice_answer, "'multiple_choice_answer'")
    if not answers:
        raise AnnotationError(f"{where}: no answers; a VQA record needs at least one answer")
    counts = Counter(answers)  # insertion-ordered: max() returns the first of the most frequent
    return max(counts, key=counts.__getitem__)


@registry.register("builder", "vqa")
class VQABuilder:
    """VQA records from either of two layouts.

    * VQAv2: ``question_path`` (``{"questions": [{"question_id", "image_id", "question"}]}``) paired
      with ``ann_path`` (``{"annotations": [{"question_id", "image_id", "answers": [{"answer"}],
      "multiple_choice_answer"}]}``); lists of paths pair up in order. The image path is
      ``image_pattern.format(split=split, image_id=image_id)`` (VQAv2's COCO file names by default).
      Every question needs an annotation (AnnotationError otherwise). Record id: ``question_id``.
      ``ann_path: null`` reads the questions alone (test-dev, whose answers are not released):
      unanswered records, which the ``vqa`` task writes as a submission file and training refuses.
    * Simple (``question_path`` unset): ``ann_path`` is JSONL (or a JSON list) of ``{"image",
      "question", "answers": [str, ...]}``; ``"answer"`` (a string or a list, as in LAVIS's VQA
      JSON) and ``"multiple_choice_answer"`` are accepted too. Record id: ``id``, else
      ``question_id``, else the line index. Video QA: ``"video"`` instead of ``"image"`` (a video
      file, a directory of its frames or a list of frame files, under ``image_root``), or, for
      records with neither, ``video_pattern`` formatted with the record's fields (e.g.
      ``"video{video_id}.mp4"`` for MSRVTT-QA's ``{"video_id", "question", "answer"}``). Open-ended
      video QA, one answer per question (MSVD-QA, MSRVTT-QA, ActivityNet-QA), is scored with the
      ``vqa`` task's ``metric: normalized_match``.
    """

    def __init__(
        self,
        ann_path: str | list[str] | None,
        image_root: str = "",
        question_path: str | list[str] | None = None,
        split: str = "train",
        image_pattern: str = "COCO_{split}2014_{image_id:012d}.jpg",
        video_pattern: str | None = None,
    ) -> None:
        self.ann_paths = None if ann_path is None else as_paths(ann_path)
        self.question_paths = None if question_path is None else as_paths(question_path)
        if self.ann_paths is None and self.question_paths is None:
            raise ConfigError("vqa: ann_path is null and question_path is not set; questions without answers "
                              "(ann_path: null) are read from VQAv2 questions files (question_path)")
        paired = self.ann_paths is not None and self.question_paths is not None
        if paired and len(self.question_paths) != len(self.ann_paths):
            raise ConfigError(
                f"vqa: {len(self.question_paths)} question_path file(s) for {len(self.ann_paths)} ann_path file(s); "
                "VQAv2 questions and annotations pair up one to one"
            )
        self.image_root = image_root
        self.split = split
        self.image_pattern = image_pattern
        if video_pattern is not None and self.question_paths is not None:
            raise ConfigError("vqa: video_pattern names the videos of the simple layout (question_path unset); "
                              "VQAv2's questions name images (image_pattern)")
        self.video_pattern = video_pattern
        try:
            image_pattern.format(split=split, image_id=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"vqa: image_pattern {image_pattern!r} cannot be formatted with split and image_id: {err!r}"
            ) from None

    def build(self) -> RecordDataset:
        records: list[dict[str, Any]] = []
        if self.question_paths is None:
            for path in self.ann_paths:
                records += self._simple(path)
        else:
            for qpath, apath in zip(self.question_paths, self.ann_paths or [None] * len(self.question_paths)):
                records += self._vqav2(qpath, apath)
        return RecordDataset(records, self.image_root)

    def _simple(self, path: str) -> list[dict[str, str]]:
        data = load_file(path)
        if isinstance(data, dict):
            kind = "annotations" if "annotations" in data else "questions" if "questions" in data else None
            hint = f"; it looks like VQAv2 {kind}: set question_path and ann_path" if kind else ""
            raise AnnotationError(f"{path}: expected a JSON list or JSONL of {{'image' (or 'video'), 'question', 'answers'}}{hint}")
        records = []
        for index, record in enumerate(data):
            where = describe_record(path, index, record, "id", "question_id")
            require_dict(where, record, "question")
            answers = record.get("answers", record.get("answer"))
            if answers is None and record.get("multiple_choice_answer") is None:
                raise AnnotationError(f"{where}: no answers; a VQA record needs 'answers'")
            texts = answer_texts(where, answers) if answers is not None else []
            answer = choose_answer(where, texts, record.get("multiple_choice_answer"))
            rid = record.get("id", record.get("question_id", index))
            question = require_str(where, record["question"], "'question'")
            image, video, videos = record_media(where, self._with_video(where, record))
            records.append(vqa_record(str(rid), image, question, texts or [answer], answer, record.get("answer_type"),
                                      video=video, videos=videos))
        return records

    def _with_video(self, where: str, record: dict[str, Any]) -> dict[str, Any]:
        """The record, with ``video_pattern``'s video when it names neither an image nor a video."""
        if self.video_pattern is None or "image" in record or "video" in record:
            return record
        try:
            return {**record, "video": self.video_pattern.format(**record)}
        except (KeyError, IndexError, ValueError) as err:
            raise AnnotationError(f"{where}: video_pattern {self.video_pattern!r} cannot be formatted with the record's "
                                  f"fields ({sorted(record)}): {err!r}") from None

    def _vqav2(self, qpath: str, apath: str | None) -> list[dict[str, Any]]:
        data = read_json(qpath)
        questions = vqav2_section(qpath, "questions", data)
        self._check_split(qpath, questions, data.get("data_subtype"))
        by_qid = None if apath is None else _annotations_by_qid(apath)
        records, seen = [], set()
        for index, q in enumerate(questions):
            where = describe_record(f"{qpath}: questions", index, q, "question_id")
            require_dict(where, q, "question_id", "image_id", "question")
            qid = q["question_id"]
            if qid in seen:
                raise AnnotationError(f"{where}: duplicate question_id")
            seen.add(qid)
            if by_qid is None:  # no annotations: a question to answer for a submission
                question = require_str(where, q["question"], "'question'")
                records.append(question_record(str(qid), self._image(where, q), question, qid))
                continue
            if qid not in by_qid:
                raise AnnotationError(f"{where}: no answers: question_id {qid!r} has no annotation in {apath}")
            aindex, ann = by_qid[qid]
            awhere = f"{where} / {apath}: annotations[{aindex}]"
            if "image_id" in ann and ann["image_id"] != q["image_id"]:
                raise AnnotationError(
                    f"{awhere}: image_id {ann['image_id']!r} differs from the question's {q['image_id']!r}"
                )
            texts = answer_texts(awhere, ann.get("answers", []))
            answer = choose_answer(awhere, texts, ann.get("multiple_choice_answer"))
            question = require_str(where, q["question"], "'question'")
            records.append(vqa_record(str(qid), self._image(where, q), question, texts or [answer], answer,
                                      ann.get("answer_type")))
        return records

    def _check_split(self, qpath: str, questions: list[Any], data_subtype: Any) -> None:
        """Fail at start when ``split`` makes image names that are not there but another split's are.

        The first :data:`SPLIT_PROBE` questions' images are looked up under ``image_root`` with ``split``;
        when none is there, the split names that the files under ``image_root`` show (and the file's
        ``data_subtype``, e.g. ``val2014``) are tried, and a split under which they are found is named as
        the way out. A split that repeats the year the pattern adds (``val2014`` in
        ``COCO_{split}2014_...``) fails even when the images are not (yet) there. When the images are
        under no split, nothing is decided here: each missing image is a counted skip."""
        fields = [field for _, field, _, _ in string.Formatter().parse(self.image_pattern) if field]
        ids = [q["image_id"] for q in questions[:SPLIT_PROBE] if isinstance(q, dict) and "image_id" in q]
        if "split" not in fields or not ids:
            return
        root = Path(self.image_root or ".")
        found = self._images_found(root, self.split, ids)
        if found:
            return
        candidates = split_candidates(self.image_pattern, root, data_subtype)
        fitting = next(((c, n) for c in candidates if c != self.split and (n := self._images_found(root, c, ids))), None)
        doubled = _repeats_year(self.image_pattern, self.split)
        if fitting is None and not doubled:
            return
        example = self._format(self.split, ids[0])
        subtype = f" (its data_subtype: {data_subtype!r})" if data_subtype else ""
        message = (f"vqa: split {self.split!r} with image_pattern {self.image_pattern!r} makes image names such as "
                   f"{example!r}, and none of the first {len(ids)} questions' images of {qpath}{subtype} is under "
                   f"image_root {str(root)!r}")
        if fitting is not None:
            split, names = fitting
            message += f"; with split {split!r} they are ({names[0]!r}): set split: {split}"
        else:
            message += (f"; the pattern adds the year after {{split}} itself: set split to the name without it "
                        f"(split: {re.sub(r'[0-9]+$', '', self.split)})")
        raise ConfigError(message + " (the dataset's 'split' key: datasets.<name>.split or evaluation.<name>.split)")

    def _format(self, split: str, image_id: Any) -> str:
        return self.image_pattern.format(split=split, image_id=image_id)

    def _images_found(self, root: Path, split: str, ids: list[Any]) -> list[str]:
        """The image names of ``ids`` under ``split`` that exist under ``root``."""
        names = []
        for image_id in ids:
            try:
                name = self._format(split, image_id)
            except (ValueError, TypeError, KeyError, IndexError):
                continue
            if (root / name).is_file():
                names.append(name)
        return names

    def _image(self, where: str, question: dict[str, Any]) -> str:
        try:
            image = self.image_pattern.format(split=self.split, image_id=question["image_id"])
        except (ValueError, TypeError) as err:
            raise AnnotationError(
                f"{where}: image_id {question['image_id']!r} does not fit image_pattern {self.image_pattern!r}: {err}"
            ) from None
        return image_path(where, image)


def _annotations_by_qid(apath: str) -> dict[Any, tuple[int, dict]]:
    """VQAv2 annotations by question_id, with their index in the file (duplicates are errors)."""
    by_qid: dict[Any, tuple[int, dict]] = {}
    for index, ann in enumerate(vqav2_section(apath, "annotations")):
        where = describe_record(f"{apath}: annotations", index, ann, "question_id")
        require_dict(where, ann, "question_id")
        if ann["question_id"] in by_qid:
            raise AnnotationError(f"{where}: duplicate question_id (also annotations[{by_qid[ann['question_id']][0]}])")
        by_qid[ann["question_id"]] = (index, ann)
    return by_qid


SPLIT_PROBE = 16  # questions whose images are looked up to check the split
SPLIT_SCAN = 256  # files under image_root read to find the split names there


def split_candidates(pattern: str, root: Path, data_subtype: Any = None) -> list[str]:
    """Split names to try with ``pattern``: those of the files under ``root`` that fit the pattern (most
    frequent first), then the annotation file's ``data_subtype`` (``val2014``), without its year (``val``)
    and without ``-dev`` (``test-dev2015``'s images are test2015's)."""
    glob, regex = "", ""
    for literal, field, _spec, _ in string.Formatter().parse(pattern):
        glob += literal.replace("[", "[[]")
        regex += re.escape(literal)
        if field is not None:
            glob += "*"
            if field == "split":
                regex += "(?P=split)" if "(?P<split>" in regex else "(?P<split>[^/]+?)"
            else:
                regex += "[^/]*?"
    found: Counter = Counter()
    if root.is_dir():
        try:
            for path in itertools.islice(root.glob(glob), SPLIT_SCAN):
                match = re.fullmatch(regex, path.relative_to(root).as_posix())
                if match and match.group("split"):
                    found[match.group("split")] += 1
        except (OSError, ValueError, re.error):
            pass
    candidates = [name for name, _ in found.most_common()]
    if isinstance(data_subtype, str) and data_subtype:
        bare = re.sub(r"[0-9]+$", "", data_subtype)
        candidates += [data_subtype, bare, data_subtype.replace("-dev", ""), bare.replace("-dev", "")]
    return list(dict.fromkeys(c for c in candidates if c))


def _repeats_year(pattern: str, split: str) -> bool:
    """Whether ``split`` ends in a number that ``pattern`` follows with digits of its own (``val2014`` in
    ``COCO_{split}2014_...`` makes ``COCO_val20142014_...``)."""
    parts = list(string.Formatter().parse(pattern))
    for (_, field, _, _), (literal, _, _, _) in zip(parts, parts[1:]):
        if field == "split" and re.search(r"[0-9]$", split) and re.match(r"[0-9]", literal):
            return True
    return False


def vqav2_section(path: str, key: str, data: Any = None) -> list[Any]:
    """The ``key`` list (``questions`` or ``annotations``) of a VQAv2 JSON file (read now unless its parsed
    ``data`` is given); an error names the file."""
    if data is None:
        data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise AnnotationError(f"{path}: expected VQAv2 {key} JSON, an object with a {key!r} list")
    return data[key]
