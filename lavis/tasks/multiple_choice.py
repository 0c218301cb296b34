"""Multiple-choice evaluation (ScienceQA, MMBench): the option letter with the lowest mean loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.multiple_choice import LETTERS, MC_PROMPT, options_text
from lavis.tasks.evaluation import EvalSample, EvalTask


@registry.register("task", "multiple_choice")
class MultipleChoiceTask(EvalTask):
    """Scores each option letter as the continuation of the prompt (``" A"``, ``" B"``, ...; without the
    space at the start of a chat answer) and picks the lowest mean token loss, as Qwen-VL scores
    ScienceQA and MMBench. Records of the ``multiple_choice`` builder. Nothing is generated.
    """

    metric_names = ("accuracy",)
    scores_options = True
    prompt_fields = ("hint", "question", "options")

    def __init__(self, prompt: str = MC_PROMPT, chat: bool = False, max_samples: int | None = None) -> None:
        super().__init__(prompt, chat, max_samples=max_samples)

    def samples(self, records: Sequence[dict[str, Any]]) -> list[EvalSample]:
        out = []
        for record in records:
            self.require(record, "question", "choices", "answer", "hint", builder_hint="multiple_choice")
            letters = LETTERS[: len(record["choices"])]
            out.append(
                EvalSample(
                    id=record["id"],
                    images=[record["image"]] if record.get("image") else [],
                    text=self.prompt.format(
                        hint=record["hint"], question=record["question"], options=options_text(record["choices"])
                    ),
                    image_root=record.get("image_root", ""),
                    reference={"question": record["question"], "choices": record["choices"], "answer": record["answer"]},
                    options=[letter if self.chat else f" {letter}" for letter in letters],
                )
            )
        return out

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        correct = sum(r["prediction"] == r["answer"] for r in results)
        return {"accuracy": correct / len(results), "correct": correct, "count": len(results)}
