"""VQA evaluation: VQAv2 accuracy with the official answer normalisation and 10-choose-9 averaging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lavis.common.registry import registry
from lavis.tasks.evaluation import EvalSample, EvalTask
from lavis.tasks.metrics import anls, exact_match, relaxed_accuracy, vqa_score

# The answer metrics: their name in the results and their per-question score (answer, references).
ANSWER_METRICS = {
    "anls": ("anls", anls),  # DocVQA, InfographicsVQA
    "relaxed_accuracy": ("relaxed_accuracy", relaxed_accuracy),  # ChartQA
    "exact_match": ("accuracy", exact_match),  # GQA, OCR-VQA, AI2D
}


@registry.register("task", "vqa")
class VQATask(EvalTask):
    """Answers each question (records of the ``vqa`` builder: VQAv2 questions + annotations, or
    JSONL; or of a released benchmark: ``textvqa``, ``gqa``, ``docvqa``, ``chartqa``) and scores it
    against all reference answers with ``metric``: ``vqa_accuracy`` (VQAv2, OK-VQA, TextVQA, VizWiz),
    ``anls`` (DocVQA), ``relaxed_accuracy`` (ChartQA) or ``exact_match`` (GQA, OCR-VQA, AI2D), each
    as Qwen-VL's eval_mm computes it. Qwen-VL's prompt: ``{question} Answer:``.
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
        metric: Literal["vqa_accuracy", "anls", "relaxed_accuracy", "exact_match"] = "vqa_accuracy",
    ) -> None:
        super().__init__(prompt, chat, max_new_tokens, num_beams, max_samples, min_new_tokens)
        self.metric = metric
        self.metric_names = (ANSWER_METRICS[metric][0],) if metric in ANSWER_METRICS else ("accuracy",)

    def samples(self, records: Sequence[dict[str, Any]]) -> list[EvalSample]:
        out = []
        for record in records:
            self.require(record, "image", "question", "answers", builder_hint="vqa")
            out.append(
                EvalSample(
                    id=record["id"],
                    images=[record["image"]],
                    text=self.prompt.format(question=record["question"]),
                    image_root=record.get("image_root", ""),
                    reference={"image": record["image"], "question": record["question"], "answers": record["answers"],
                               **({"answer_type": record["answer_type"]} if "answer_type" in record else {})},
                )
            )
        return out

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        """Accuracy over all questions and, when the records give VQAv2's answer types, per type
        (``accuracy/yes/no``, ``accuracy/number``, ``accuracy/other``), as the official output has."""
        if self.metric in ANSWER_METRICS:
            name, score = ANSWER_METRICS[self.metric]
            return {name: sum(score(r["prediction"], r["answers"]) for r in results) / len(results), "count": len(results)}
        scores = vqa_score([r["prediction"] for r in results], [r["answers"] for r in results])
        for answer_type in sorted({r["answer_type"] for r in results if "answer_type" in r}):
            typed = [r for r in results if r.get("answer_type") == answer_type]
            scores[f"accuracy/{answer_type}"] = vqa_score([r["prediction"] for r in typed], [r["answers"] for r in typed])["accuracy"]
        return scores
