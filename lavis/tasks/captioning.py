"""Captioning evaluation: one caption per image, CIDEr and BLEU-4 against all its reference captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lavis.common.registry import registry
from lavis.tasks.evaluation import EvalSample, EvalTask
from lavis.tasks.metrics import caption_scores


@registry.register("eval_task", "captioning")
class CaptioningTask(EvalTask):
    """Generates one caption per image (records of ``coco_caption``: COCO captions, Karpathy's split
    JSON, e.g. its ``test`` split, or a list) and scores corpus CIDEr and BLEU-4 (pycocoevalcap)
    against every reference caption of the image, tokenized as the COCO caption evaluation does
    (``tokenizer: ptb``, Java; without Java a fallback, flagged ``ptb: 0`` in the metrics and the
    table). Qwen-VL's prompt: ``Describe the image in English:``.
    """

    metric_names = ("CIDEr", "BLEU-4")

    def __init__(
        self,
        prompt: str = "Describe the image in English:",
        chat: bool = False,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        max_samples: int | None = None,
        min_new_tokens: int = 8,
        tokenizer: Literal["ptb", "simple"] = "ptb",
    ) -> None:
        super().__init__(prompt, chat, max_new_tokens, num_beams, max_samples, min_new_tokens)
        self.tokenizer = tokenizer

    def samples(self, records: Sequence[dict[str, Any]]) -> list[EvalSample]:
        by_image: dict[str, EvalSample] = {}
        for record in records:
            self.require(record, "image", "caption", builder_hint="coco_caption")
            sample = by_image.get(record["image"])
            if sample is None:
                sample = by_image[record["image"]] = EvalSample(
                    id=record["image"],
                    images=[record["image"]],
                    text=self.prompt,
                    image_root=record.get("image_root", ""),
                    reference={"image": record["image"], "references": []},
                )
            sample.reference["references"].append(record["caption"])
        return list(by_image.values())

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        predictions = {r["id"]: r["prediction"] for r in results}
        references = {r["id"]: r["references"] for r in results}
        return caption_scores(predictions, references, self.tokenizer)
