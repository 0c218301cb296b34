"""Held-out loss (``evaluation.<name>.task: heldout_loss``): the training loss on records the model is not trained
on, nothing generated; in ``evaluate.py`` and, with ``run.eval_every``, during training (a validation curve in
``metrics.jsonl`` as ``eval/<name>/loss``; ``run.best_metric: <name>/loss`` with ``best_mode: min``).

Records of a training builder (``builder:`` and its keys, as under ``datasets:``), encoded as training encodes
them (the run's ``max_len``, ``label_policy``, system message; a too-long sample cut or skipped as the training
stream does):

- conversations or prompt / target records: ``loss``, the mean NLL of the supervised tokens over the whole
  evaluation (every token weighs the same, as in training), ``perplexity`` = exp(loss), ``tokens``;
- preference pairs (a preference builder): ``pair_accuracy``, the share of pairs whose chosen answer has the
  higher summed log-probability (no reference model: the policy's own preference), ``margin``, the mean of
  log p(chosen) - log p(rejected), and ``chosen_nll``, the chosen answers' mean token NLL (DPO's SFT term).

Each record's figures are written to ``<name>.json`` (``predictions``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lavis.common.config import Config, ConfigError
from lavis.common.registry import registry
from lavis.models import Processors
from lavis.models.vlm import VisionLanguageModel
from lavis.tasks.dpo import DPOTask, answer_logps
from lavis.tasks.evaluation import EvalTask
from lavis.tasks.sft import LanguageModelingTask


@registry.register("eval_task", "heldout_loss")
class HeldOutLossTask(EvalTask):
    """The training loss of held-out records (see the module notes). ``max_samples``: the first N records."""

    scores_loss = True
    metric_names = ("loss", "perplexity")
    PAIR_METRICS = ("pair_accuracy", "margin", "chosen_nll")

    def __init__(self, max_samples: int | None = None) -> None:
        super().__init__(prompt="", max_samples=max_samples)
        self.pairs = False
        self.processor = self.collate = None

    def samples(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records themselves (each with an ``id``), all conversations / targets or all preference pairs."""
        if not hasattr(records, "__len__"):
            raise ConfigError("heldout_loss reads the records of an annotation file, not a stream (webdataset "
                              "shards): evaluate a held-out annotation file, e.g. a COCO-style captions file")
        records = [records[i] for i in range(len(records))]
        kinds = {"pair" if "chosen" in r else "lm" for r in records}
        if len(kinds) > 1:
            raise ConfigError("heldout_loss: the records mix preference pairs with other records; give each kind an "
                              "evaluation of its own")
        self.pairs = kinds == {"pair"}
        if self.pairs:
            self.metric_names = self.PAIR_METRICS
        for i, record in enumerate(records):
            if "chosen" not in record and "target" not in record and "messages" not in record:
                raise ConfigError(f"heldout_loss: record {record.get('id', i)!r} has nothing to score (no answer: "
                                  "messages, target, or chosen / rejected)")
            record.setdefault("id", str(i))
        return records

    def prepare(self, cfg: Config, model: VisionLanguageModel, processors: Processors) -> None:
        """Encode and collate as the training task of these records does."""
        if self.pairs:
            training = DPOTask(cfg)
            self.processor = training.sample_processor(model, processors)
            self.collate = training.collator(processors, model.llm.config._attn_implementation)
        else:
            training = LanguageModelingTask(cfg)
            self.processor = training.sample_processor(model, processors)
            from lavis.datasets.collate import PadCollator

            self.collate = PadCollator(pad_id=processors.tokenizer.pad_id)

    def score(self, model: VisionLanguageModel, batch: dict[str, Any], ids: list[str]) -> list[dict[str, Any]]:
        """Each record's figures from one collated batch (on the model's device)."""
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), pixel_values=batch["pixel_values"], reduction="none",
                    **batch.get("attention_kwargs", {}))
        if self.pairs:
            logps, tokens = answer_logps(out, batch["answer_index"], len(ids))
            return [{"id": i, "chosen_logp": float(lp[0]), "rejected_logp": float(lp[1]), "chosen_tokens": int(t[0])}
                    for i, lp, t in zip(ids, logps.float().cpu(), tokens.cpu(), strict=True)]
        rows = out.selected.nonzero()[:, 0]
        sums = out.losses.new_zeros(len(ids), dtype=torch.float64).index_add(0, rows, out.losses.double())
        counts = out.selected.sum(1)
        return [{"id": i, "nll_sum": float(s), "tokens": int(n)} for i, s, n in zip(ids, sums.cpu(), counts.cpu(), strict=True)]

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        if self.pairs:
            margins = [r["chosen_logp"] - r["rejected_logp"] for r in results]
            return {"pair_accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
                    "chosen_nll": -sum(r["chosen_logp"] for r in results) / max(1, sum(r["chosen_tokens"] for r in results)),
                    "count": len(results)}
        tokens = sum(r["tokens"] for r in results)
        loss = sum(r["nll_sum"] for r in results) / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "count": len(results)}
