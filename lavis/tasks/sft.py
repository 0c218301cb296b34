"""Language-modelling tasks: next-token loss on the supervised tokens (all three Qwen-VL stages)."""

from __future__ import annotations

import logging
from typing import Any

from lavis.common import dist
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.collate import PackCollator, PadCollator
from lavis.datasets.stream import Source
from lavis.models import Processors
from lavis.models.vlm import LMLoss, VisionLanguageModel
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.sample import SampleProcessor
from lavis.tasks.base import TrainingTask

log = logging.getLogger(__name__)


@registry.register("task", "sft")
@registry.register("task", "pretrain")
class LanguageModelingTask(TrainingTask):
    """Next-token loss on supervised tokens: assistant turns of conversations (SFT) or the targets
    of prompt/target records (pretraining, multi-task). The datasets' formats decide what is
    supervised, so one task serves every stage; ``sft`` and ``pretrain`` name it.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def sample_processor(self, model: VisionLanguageModel, processors: Processors) -> SampleProcessor:
        run = self.cfg.run
        encoder = ConversationEncoder(
            processors.tokenizer, model.image_tokens, self.cfg.model.system_message, run.max_len, run.label_policy
        )
        # Packed runs drop over-long samples whole; padded runs cut them at the end.
        return SampleProcessor(encoder, processors.image, truncate=not run.pack, video_processor=processors.video)

    def build_sources(self) -> list[Source]:
        """Every configured dataset, read and validated now (a bad annotation file fails at start)."""
        if not self.cfg.datasets:
            raise ValueError("no datasets configured: add one under 'datasets:'")
        sources = []
        for name, ds_cfg in self.cfg.datasets.items():
            if ds_cfg.synthetic_root:  # generated on first use by the registered generator it names
                generate = registry.get("synthetic_world", ds_cfg.synthetic_world)
                with dist.local_main_first():  # once per node, not once per rank
                    generate(ds_cfg.synthetic_root)
            data = registry.get("builder", ds_cfg.builder)(**ds_cfg.params).build()
            if hasattr(data, "__len__") and len(data) == 0:
                files = [f"{k}={v}" for k, v in ds_cfg.params.items() if k.endswith("path") or k == "shards"]
                raise AnnotationError(f"datasets.{name} ({ds_cfg.builder}): no records in {', '.join(files) or 'its files'}")
            unanswered = next((r for r in getattr(data, "records", ()) if "target" not in r and "messages" not in r), None)
            if unanswered is not None:
                raise AnnotationError(
                    f"datasets.{name} ({ds_cfg.builder}): record {unanswered.get('id')!r} has no answer to train on; "
                    "questions without answers (e.g. VQAv2 test-dev, ann_path: null) are for evaluation only"
                )
            size = f"{len(data)} records" if hasattr(data, "__len__") else "streaming"
            log.info("dataset %s (%s): %s, ratio %g", name, ds_cfg.builder, size, ds_cfg.ratio)
            sources.append(Source(name, data, ds_cfg.ratio))
        return sources

    def collator(self, processors: Processors, attn_implementation: str) -> PadCollator | PackCollator:
        if not self.cfg.run.pack:
            return PadCollator(pad_id=processors.tokenizer.pad_id)
        isolation = "cu_seqlens" if attn_implementation.startswith("flash_attention") else "block_mask"
        return PackCollator(pad_id=processors.tokenizer.pad_id, isolation=isolation)

    @staticmethod
    def inputs(batch: dict[str, Any]) -> dict[str, Any]:
        """The model's keyword arguments from a collated batch (padded or packed)."""
        return {
            "input_ids": batch["input_ids"],
            "labels": batch["labels"],
            "attention_mask": batch["attention_mask"],
            "position_ids": batch.get("position_ids"),
            "pixel_values": batch["pixel_values"],
            **batch.get("attention_kwargs", {}),
        }

    def train_step(self, model: VisionLanguageModel, batch: dict) -> LMLoss:
        """The batch's summed loss, through the model's ``forward`` (the strategy's wrapper sees it)."""
        return model(**self.inputs(batch))
