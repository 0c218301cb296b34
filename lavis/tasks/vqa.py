"""VQA evaluation: VQAv2 accuracy with the official answer normalisation and 10-choose-9 averaging (or
another answer metric: ANLS, relaxed accuracy, exact or normalised match), or, for questions without
answers (VQAv2 test-dev), the results file of the evaluation server. Questions about a picture or a video."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, require_dict
from lavis.datasets.builders.vqa import vqav2_section
from lavis.tasks.evaluation import EvalSample, EvalTask
from lavis.tasks.metrics import anls, exact_match, normalize_vqa_answer, relaxed_accuracy, vqa_score


def normalized_match(prediction: str, answers: list[str]) -> float:
    """1 if the answer equals a reference once both are normalised as VQAv2's evaluation normalises answers
    (case, punctuation, articles, number words: ``"Two dogs."`` matches ``"2 dogs"``): the accuracy of
    open-ended video QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA), whose questions have one reference answer."""
    answer = normalize_vqa_answer(prediction)
    return float(any(answer == normalize_vqa_answer(a) for a in answers))


# The answer metrics: their name in the results and their per-question score (answer, references).
ANSWER_METRICS = {
    "anls": ("anls", anls),  # DocVQA, InfographicsVQA
    "relaxed_accuracy": ("relaxed_accuracy", relaxed_accuracy),  # ChartQA
    "exact_match": ("accuracy", exact_match),  # GQA, OCR-VQA, AI2D
    "normalized_match": ("accuracy", normalized_match),  # open-ended video QA: MSVD-QA, MSRVTT-QA, ActivityNet-QA
}
VQA_CONSENSUS = 3  # vqa_accuracy: an answer is fully right when this many humans gave it

log = logging.getLogger(__name__)


@registry.register("eval_task", "vqa")
class VQATask(EvalTask):
    """Answers each question (records of the ``vqa`` builder: VQAv2 questions + annotations, or
    JSONL; or of a released benchmark: ``textvqa``, ``gqa``, ``docvqa``, ``chartqa``, ``ocrvqa``) and
    scores it against all reference answers with ``metric``: ``vqa_accuracy`` (VQAv2, OK-VQA, TextVQA,
    VizWiz), ``anls`` (DocVQA), ``relaxed_accuracy`` (ChartQA) or ``exact_match`` (GQA, OCR-VQA, AI2D),
    each as Qwen-VL's eval_mm computes it, or ``normalized_match`` (open-ended video QA, one reference
    answer each: :func:`normalized_match`). Qwen-VL's prompt: ``{question} Answer:``. A record's
    ``video`` is asked about as ``<video>path</video>`` before the prompt (a model with a video processor).

    ``vqa_accuracy`` needs several human answers (3 agreeing score 1); records that all have fewer
    than 3 could never score 1 (one answer always scores 0): a warning names ``normalized_match``.

    Questions without answers (the ``vqa`` builder's VQAv2 layout with ``ann_path: null``, e.g.
    test-dev) are not scored: the metrics count the ``answered`` questions and the evaluation writes
    the server's results file, ``[{"question_id", "answer"}]`` (see :meth:`submission`).
    ``submission_questions_path``: the VQAv2 questions file the submission must cover
    (``v2_OpenEnded_mscoco_test2015_questions.json``: EvalAI's VQA Challenge takes test2015-wide files
    in its test-dev phase too); its questions not answered here get ``""``.
    """

    metric_names = ("accuracy",)
    prompt_fields = ("question",)

    def __init__(
        self,
        prompt: str = "{question} Answer:",
        chat: bool = False,
        max_new_tokens: int = 10,
        num_beams: int = 1,
        max_samples: int | None = None,
        min_new_tokens: int = 1,
        metric: Literal["vqa_accuracy", "anls", "relaxed_accuracy", "exact_match", "normalized_match"] = "vqa_accuracy",
        submission_questions_path: str | None = None,
    ) -> None:
        super().__init__(prompt, chat, max_new_tokens, num_beams, max_samples, min_new_tokens)
        self.metric = metric
        self.metric_names = (ANSWER_METRICS[metric][0],) if metric in ANSWER_METRICS else ("accuracy",)
        if submission_questions_path is not None and not Path(submission_questions_path).is_file():
            raise ConfigError(f"{self.registry_name}: submission_questions_path: file not found: {submission_questions_path} "
                              "(VQAv2's v2_OpenEnded_mscoco_test2015_questions.json, https://visualqa.org/download.html)")
        self.submission_questions_path = submission_questions_path
        self.unanswered = False  # set by samples(): the records have no answers (a submission)
        self.submission_ids: list[Any] | None = None  # submission_questions_path' question ids, in its order

    def samples(self, records: Sequence[dict[str, Any]]) -> list[EvalSample]:
        records = list(records)
        self._check_answered(records)
        out = []
        for record in records:
            media = "video" if record.get("video") is not None else "image"
            if self.unanswered:
                self.require(record, media, "question", "question_id", builder_hint="vqa (ann_path: null)")
                reference = {media: record[media], "question": record["question"], "question_id": record["question_id"]}
            else:
                self.require(record, media, "question", "answers", builder_hint="vqa")
                reference = {media: record[media], "question": record["question"], "answers": record["answers"],
                             **({"answer_type": record["answer_type"]} if "answer_type" in record else {})}
            out.append(
                EvalSample(
                    id=record["id"],
                    images=[record["image"]] if media == "image" else [],
                    text=self.prompt.format(question=record["question"]),
                    image_root=record.get("image_root", ""),
                    reference=reference,
                    videos=[record["video"]] if media == "video" else [],
                    video_sources=record.get("videos") or {},
                )
            )
        if self.unanswered and self.submission_questions_path is not None:
            self.submission_ids = self._submission_ids(records)
        return out

    def _check_answered(self, records: list[dict[str, Any]]) -> None:
        """All records answered (scored) or none (a submission); a mix is an error naming one of each."""
        answered = [r for r in records if "answers" in r]
        if answered and len(answered) != len(records):
            unanswered = next(r for r in records if "answers" not in r)
            raise ConfigError(
                f"{self.registry_name}: record {answered[0].get('id')!r} has answers and record {unanswered.get('id')!r} "
                "has none: one evaluation is either scored (every question answered) or a submission (none); "
                "evaluate them as two entries"
            )
        self.unanswered = bool(records) and not answered
        if answered and self.metric == "vqa_accuracy" and all(len(r["answers"]) < VQA_CONSENSUS for r in answered):
            log.warning(
                "%s: metric vqa_accuracy counts an answer right when %d of the humans' answers agree with it, and these "
                "records have at most %d reference answer(s) each (record %r: %r), so no answer can score 1 (with one "
                "answer, every answer scores 0); set metric: normalized_match (one reference answer: open-ended video QA, "
                "MSVD-QA, MSRVTT-QA) or exact_match", self.registry_name, VQA_CONSENSUS,
                max(len(r["answers"]) for r in answered), answered[0].get("id"), answered[0]["answers"],
            )
        if self.unanswered:
            self.metric_names = ("answered",)
        elif self.submission_questions_path is not None:
            raise ConfigError(
                f"{self.registry_name}: submission_questions_path is set but the records have answers; a submission "
                "file is written for questions without answers (the vqa builder with ann_path: null)"
            )

    def _submission_ids(self, records: list[dict[str, Any]]) -> list[Any]:
        """The question ids of ``submission_questions_path``; every record's question must be among them."""
        path = self.submission_questions_path
        ids = [require_dict(f"{path}: questions[{index}]", question, "question_id")["question_id"]
               for index, question in enumerate(vqav2_section(path, "questions"))]
        known = set(ids)
        stray = next((r for r in records if r["question_id"] not in known), None)
        if stray is not None:
            raise AnnotationError(
                f"record {stray['id']!r}: question_id {stray['question_id']!r} is not in submission_questions_path {path}"
            )
        return ids

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        """Accuracy over all questions and, when the records give VQAv2's answer types, per type
        (``accuracy/yes/no``, ``accuracy/number``, ``accuracy/other``), as the official output has;
        for questions without answers, the number ``answered``."""
        if self.unanswered:
            return {"answered": len(results), "count": len(results)}
        if self.metric in ANSWER_METRICS:
            name, score = ANSWER_METRICS[self.metric]
            return {name: sum(score(r["prediction"], r["answers"]) for r in results) / len(results), "count": len(results)}
        scores = vqa_score([r["prediction"] for r in results], [r["answers"] for r in results])
        for answer_type in sorted({r["answer_type"] for r in results if "answer_type" in r}):
            typed = [r for r in results if r.get("answer_type") == answer_type]
            scores[f"accuracy/{answer_type}"] = vqa_score([r["prediction"] for r in typed], [r["answers"] for r in typed])["accuracy"]
        return scores

    def submission(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """For questions without answers, VQAv2's results file (EvalAI): ``[{"question_id", "answer"}]``
        with the generated answer stripped, as Qwen-VL writes it; with ``submission_questions_path``, every
        question of that file in its order, ``""`` where not answered. None for scored records."""
        if not self.unanswered:
            return None
        answers = {r["question_id"]: r["output"].strip() for r in results}
        ids = self.submission_ids if self.submission_ids is not None else list(answers)
        return [{"question_id": qid, "answer": answers.get(qid, "")} for qid in ids]
