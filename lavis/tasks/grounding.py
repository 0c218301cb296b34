"""Grounding evaluation: the first generated box against the referred object's box, Acc@IoU>=0.5."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.tasks.evaluation import EvalSample, EvalTask
from lavis.tasks.metrics import grounding_accuracy


@registry.register("eval_task", "grounding")
class GroundingTask(EvalTask):
    """Grounds each referring expression (records of ``ref_grounding``: RefCOCO/RefCOCO+/RefCOCOg
    splits, e.g. ``val``, ``testA``, ``testB``) and scores the first box of the output, scaled from
    [0, 999] to pixels, by IoU with the ground truth, as Qwen-VL's eval_mm/evaluate_grounding.py
    does (``parser: qwen_vl``; ``lenient`` accepts any box spelling, for diagnosis). An output without
    a parseable box is a miss.
    Qwen-VL's prompt: ``<ref>{expression}</ref><box>`` (the model continues with the coordinates).
    """

    metric_names = ("accuracy",)
    prompt_fields = ("expression",)

    def __init__(
        self,
        prompt: str = "<ref>{expression}</ref><box>",
        chat: bool = False,
        max_new_tokens: int = 28,
        num_beams: int = 1,
        max_samples: int | None = None,
        min_new_tokens: int = 10,
        iou_threshold: float = 0.5,
        parser: Literal["qwen_vl", "lenient"] = "qwen_vl",
    ) -> None:
        super().__init__(prompt, chat, max_new_tokens, num_beams, max_samples, min_new_tokens)
        if not 0 < iou_threshold <= 1:
            raise ConfigError(f"grounding: iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.parser = parser

    def samples(self, records: Sequence[dict[str, Any]]) -> list[EvalSample]:
        out = []
        for record in records:
            self.require(record, "image", "expression", "bbox", "width", "height", builder_hint="ref_grounding")
            out.append(
                EvalSample(
                    id=record["id"],
                    images=[record["image"]],
                    text=self.prompt.format(expression=record["expression"]),
                    image_root=record.get("image_root", ""),
                    reference={key: record[key] for key in ("image", "expression", "bbox", "width", "height")},
                )
            )
        return out

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        return grounding_accuracy(
            [r["output"] for r in results],
            [tuple(r["bbox"]) for r in results],
            [(r["width"], r["height"]) for r in results],
            threshold=self.iou_threshold,
            parser=self.parser,
        )
