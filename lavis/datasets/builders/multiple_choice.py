"""Multiple-choice builder: ScienceQA / MMBench-style questions as JSONL (or a JSON list), about a
picture, a video or neither.

Each line::

    {"id"?, "image"?: "sqa/1.png", "question": "Which is a mammal?", "choices": ["frog", "cat"],
     "answer": 1, "hint"?: "context text", "split"?}

``choices`` (or ``candidates``, MVBench's name) is a list (lettered A, B, ...) or a mapping ``{"A":
"frog", "B": "cat"}``; ``answer`` is an index into the choices, a letter, or the text of one choice
(MVBench). ``hint`` (MMBench) or ``context`` (ScienceQA) is optional (``N/A`` when absent, as Qwen-VL
writes it). ``video`` instead of ``image`` (a video file, a directory of its frames or a list of frame
files, under ``image_root``) asks about a video: MVBench's task JSON (``{"video", "question", "candidates",
"answer"}``) reads as it is released. Every record becomes, as in Qwen-VL's evaluation::

    prompt  "<img>{image}</img>Context: {hint}\\nQuestion: {question}\\nOptions: A. frog\\nB. cat\\nAnswer:"
    target  " B"

(a video: ``<video>{video}</video>`` in place of the ``<img>`` span).
"""

from __future__ import annotations

from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.base import (
    AnnotationError,
    RecordDataset,
    SplitFilter,
    as_paths,
    describe_record,
    read_annotations,
    require_dict,
    require_str,
)
from lavis.datasets.builders.media import media_reference, record_media

LETTERS = "ABCDEFGHIJ"
MC_PROMPT = "Context: {hint}\nQuestion: {question}\nOptions: {options}\nAnswer:"


def options_text(choices: list[str]) -> str:
    """``A. frog\\nB. cat``: the choices lettered, one per line."""
    return "\n".join(f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices))


def choice_texts(where: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        letters = list(value)
        if letters != list(LETTERS[: len(letters)]):
            raise AnnotationError(f"{where}: 'choices' keys must be A, B, C, ... in order, got {letters}")
        value = list(value.values())
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS):
        raise AnnotationError(f"{where}: 'choices' must list 2 to {len(LETTERS)} options, got {value!r}")
    return [require_str(where, c, f"choice {k}") for k, c in enumerate(value)]


def answer_letter(where: str, answer: Any, n: int, choices: list[str] | None = None) -> str:
    """The letter of ``answer``: a choice index or letter, or, with ``choices``, the text of one of them
    (a letter that is the text of another choice is ambiguous: an AnnotationError)."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return LETTERS[answer]
    text = answer.strip() if isinstance(answer, str) else None
    matches = [k for k, choice in enumerate(choices or []) if choice == text]
    if text is not None and text in LETTERS[:n]:
        if matches and LETTERS[matches[0]] != text:
            raise AnnotationError(f"{where}: 'answer' {answer!r} is both the letter of choice {text} and the text of choice "
                                  f"{LETTERS[matches[0]]}; give the choice's index instead")
        return text
    if len(matches) == 1:
        return LETTERS[matches[0]]
    texts = " or the text of one choice" if choices else ""
    raise AnnotationError(f"{where}: 'answer' must be a choice index (0..{n - 1}), letter (A..{LETTERS[n - 1]}){texts}, "
                          f"got {answer!r}" + (f" (the text of {len(matches)} choices)" if len(matches) > 1 else ""))


@registry.register("builder", "multiple_choice")
class MultipleChoiceBuilder:
    """Multiple-choice questions (see the module notes). ``split`` keeps records with that ``"split"``.

    Records carry, besides the training prompt/target, ``question``, ``hint``, ``choices`` and the
    ``answer`` letter for the ``multiple_choice`` evaluation task, and their ``image`` or ``video``.
    Record id: ``id``, else the index.
    """

    def __init__(self, ann_path: str | list[str], image_root: str = "", split: str | None = None) -> None:
        self.ann_paths = as_paths(ann_path)
        self.image_root = image_root
        self.splits = SplitFilter(split)

    def build(self) -> RecordDataset:
        records: list[dict[str, Any]] = []
        for path in self.ann_paths:
            splits = self.splits.reading(path)
            for index, record in enumerate(read_annotations(path)):
                where = describe_record(path, index, record)
                if isinstance(record, dict) and "choices" not in record and "candidates" in record:  # MVBench
                    record = {**record, "choices": record["candidates"]}
                require_dict(where, record, "question", "choices", "answer")
                if splits.keeps(record.get("split")):
                    records.append(self._record(where, record, index))
            splits.check()
        return RecordDataset(records, self.image_root)

    @staticmethod
    def _record(where: str, record: dict[str, Any], index: int) -> dict[str, Any]:
        choices = choice_texts(where, record["choices"])
        image, video, videos = record_media(where, record, required=False)
        if video is not None and ("start" in record or "end" in record):  # MVBench's clips of a longer video
            raise AnnotationError(f"{where}: 'start'/'end' (a segment of the video) are not supported: the whole video "
                                  "would be asked about; cut the segment into a file of its own")
        return mc_record(
            str(record.get("id", index)), image, require_str(where, record["question"], "'question'"), choices,
            answer_letter(where, record["answer"], len(choices), choices), record.get("hint") or record.get("context"),
            video=video, videos=videos,
        )


def mc_record(
    rid: str,
    image: str | None,
    question: str,
    choices: list[str],
    answer: str,
    hint: str | None = None,
    category: str | None = None,
    circular_group: str | None = None,
    video: str | None = None,
    videos: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A multiple-choice record: Qwen-VL's training prompt and target, plus what the ``multiple_choice``
    task reads (``question``, ``hint``, ``choices``, the ``answer`` letter; ``category`` for accuracy
    per category; ``circular_group``: the question this record is a rotation of, for circular evaluation;
    ``video``: the video it asks about, in place of ``image``, a frame list's frames in ``videos``)."""
    hint = hint or "N/A"
    text = MC_PROMPT.format(hint=hint, question=question, options=options_text(choices))
    record = {
        "id": rid,
        "prompt": media_reference(image, video) + text,
        "target": f" {answer}",
        "image": image,
        "question": question,
        "hint": hint,
        "choices": choices,
        "answer": answer,
    }
    if video is not None:
        record["video"] = video
    if videos:
        record["videos"] = videos
    if category is not None:
        record["category"] = category
    if circular_group is not None:
        record["circular_group"] = circular_group
    return record
