"""Language-modelling tasks: the loss over supervised tokens of conversations."""

from __future__ import annotations

import logging

from torch.utils.data import ConcatDataset, Dataset

from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.datasets.collate import PadCollator
from lavis.datasets.processed import ProcessedDataset
from lavis.models import Processors
from lavis.models.vlm import LMLoss, VisionLanguageModel
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.sample import SampleProcessor

log = logging.getLogger(__name__)


@registry.register("task", "sft")
class SFTTask:
    """Supervised fine-tuning on ChatML conversations: loss on assistant turns only."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def sample_processor(self, model: VisionLanguageModel, processors: Processors) -> SampleProcessor:
        encoder = ConversationEncoder(
            processors.tokenizer, model.num_image_tokens, self.cfg.model.system_message, self.cfg.run.max_len
        )
        return SampleProcessor(encoder, processors.image)

    def build_train_dataset(self, model: VisionLanguageModel, processors: Processors) -> Dataset:
        """All configured datasets, read and validated now, behind one sample processor."""
        if not self.cfg.datasets:
            raise ValueError("no datasets configured: add one under 'datasets:'")
        parts = []
        for name, ds_cfg in self.cfg.datasets.items():
            if ds_cfg.synthetic_root:
                from lavis.datasets.synthetic.world import ensure_world

                ensure_world(ds_cfg.synthetic_root)
            records = registry.get("builder", ds_cfg.builder)(**ds_cfg.params).build()
            log.info("dataset %s (%s): %d records", name, ds_cfg.builder, len(records))
            parts.append(records)
        if len({ds.ratio for ds in self.cfg.datasets.values()}) > 1:
            raise NotImplementedError("datasets with different 'ratio' need the mixture sampler, not available yet")
        records = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        return ProcessedDataset(records, self.sample_processor(model, processors))

    def collator(self, processors: Processors) -> PadCollator:
        return PadCollator(pad_id=processors.tokenizer.pad_id)

    def train_step(self, model: VisionLanguageModel, batch: dict) -> LMLoss:
        return model.lm_loss(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )
