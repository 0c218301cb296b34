"""Multiple-choice evaluation (ScienceQA, MMBench, SEED-Bench, AI2D): the option letter with the lowest
mean loss; MMBench's circular evaluation; accuracy per category."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lavis.common.registry import registry
from lavis.datasets.builders.multiple_choice import LETTERS, MC_PROMPT, options_text
from lavis.tasks.evaluation import EvalSample, EvalTask


@registry.register("eval_task", "multiple_choice")
class MultipleChoiceTask(EvalTask):
    """Scores each option letter as the continuation of the prompt (``" A"``, ``" B"``, ...; without the
    space at the start of a chat answer) and picks the lowest mean token loss, as Qwen-VL scores
    ScienceQA, MMBench and SEED-Bench. Records of the ``multiple_choice`` builder or of a released
    benchmark's (``scienceqa``, ``mmbench``, ``seed_bench``, ``ai2d``). Nothing is generated. A record's
    ``video`` (MVBench-style video questions) is asked about as ``<video>path</video>`` before the prompt.

    Records that carry a ``circular_group`` (MMBench's rotations of one question) are scored by
    circular evaluation: ``accuracy`` is the share of groups answered right in every rotation, and
    ``accuracy/single_pass`` the share of rows. Records with a ``category`` also give
    ``accuracy/<category>`` (of groups, under circular evaluation).
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
                    videos=[record["video"]] if record.get("video") else [],
                    video_sources=record.get("videos") or {},
                    text=self.prompt.format(
                        hint=record["hint"], question=record["question"], options=options_text(record["choices"])
                    ),
                    image_root=record.get("image_root", ""),
                    reference={"question": record["question"], "choices": record["choices"], "answer": record["answer"],
                               **{k: record[k] for k in ("category", "circular_group") if k in record}},
                    options=[letter if self.chat else f" {letter}" for letter in letters],
                )
            )
        return out

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        passes = [(r.get("circular_group", r["id"]), r.get("category"), r["prediction"] == r["answer"]) for r in results]
        questions: dict[str, tuple[str | None, bool]] = {}  # group -> (category, right in every pass)
        for group, category, right in passes:
            questions[group] = (category, questions.get(group, (category, True))[1] and right)
        correct = sum(right for _, right in questions.values())
        out: dict[str, float | int] = {"accuracy": correct / len(questions), "correct": correct, "count": len(questions)}
        if len(questions) < len(results):
            out["accuracy/single_pass"] = sum(right for _, _, right in passes) / len(passes)
        for category in sorted({c for c, _ in questions.values() if c is not None}):
            scored = [right for c, right in questions.values() if c == category]
            out[f"accuracy/{category}"] = sum(scored) / len(scored)
        return out
