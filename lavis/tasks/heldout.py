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
  log p(chosen) - log p(rejected), and ``chosen_nll``, the chosen answers' mean token NLL (DPO's SFT term);
  with ``reference`` (a trained model, as ``model.load_from`` takes it: e.g. the SFT run DPO started from) also
  DPO's implicit rewards as TRL reports them on held-out pairs: ``rewards/accuracies`` (the share of pairs whose
  chosen reward is the higher), ``rewards/margins``, ``rewards/chosen``, ``rewards/rejected`` (means; a reward is
  ``beta`` x the log-ratio to the reference, ``beta`` of ``run.dpo`` unless set). The reference's
  log-probabilities are computed once, at the first evaluation.

Each record's figures are written to ``<name>.json`` (``predictions``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lavis.common.config import Config, ConfigError
from lavis.common.registry import registry
from lavis.datasets.collate import PadCollator
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

    REWARD_METRICS = ("rewards/accuracies", "rewards/margins")

    def __init__(self, max_samples: int | None = None, reference: str | None = None, beta: float | None = None) -> None:
        super().__init__(prompt="", max_samples=max_samples)
        if beta is not None and beta <= 0:
            raise ConfigError(f"heldout_loss: beta must be > 0, got {beta:g}")
        self.reference_path, self.beta = reference, beta
        self.pairs = False
        self.processor = self.collate = None
        self.reference: VisionLanguageModel | None = None
        self.reference_logps: dict[str, tuple[float, float]] = {}  # by record id, computed once

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
        if self.reference_path and not self.pairs:
            raise ConfigError("heldout_loss: reference scores preference pairs (DPO's rewards); these records are "
                              "not pairs: leave reference unset")
        if self.pairs:
            self.metric_names = self.PAIR_METRICS + (self.REWARD_METRICS if self.reference_path else ())
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
            if self.beta is None:
                self.beta = cfg.run.dpo.beta
            if self.reference_path:
                self.reference = self._load_reference(model)
        else:
            self.processor = LanguageModelingTask(cfg).sample_processor(model, processors)
            self.collate = PadCollator(pad_id=processors.tokenizer.pad_id)

    def _load_reference(self, model: VisionLanguageModel) -> VisionLanguageModel:
        """The reference model, built from its own run's config.yaml, frozen, on the policy's device."""
        from lavis.models.loading import load_model

        device = model.llm.get_input_embeddings().weight.device
        try:
            reference, _ = load_model(self.reference_path, device=str(device))
        except FileNotFoundError as err:
            raise ConfigError(f"heldout_loss: reference: {err}") from None
        vocab = [m.llm.get_input_embeddings().weight.shape[0] for m in (model, reference)]
        if vocab[0] != vocab[1]:
            raise ConfigError(f"heldout_loss: reference {self.reference_path} has a vocabulary of {vocab[1]} tokens, the "
                              f"model {vocab[0]}: a reference must be the same model family (e.g. the run DPO started from)")
        return reference.requires_grad_(False).eval()

    def score(self, model: VisionLanguageModel, batch: dict[str, Any], ids: list[str]) -> list[dict[str, Any]]:
        """Each record's figures from one collated batch (on the model's device)."""
        out = model(**LanguageModelingTask.inputs(batch), reduction="none")
        if self.pairs:
            logps, tokens = answer_logps(out, batch["answer_index"], len(ids))
            results = [{"id": i, "chosen_logp": float(lp[0]), "rejected_logp": float(lp[1]), "chosen_tokens": int(t[0])}
                       for i, lp, t in zip(ids, logps.float().cpu(), tokens.cpu(), strict=True)]
            if self.reference is not None:
                if any(i not in self.reference_logps for i in ids):
                    scored = self.reference(**LanguageModelingTask.inputs(batch), reduction="none")
                    ref = answer_logps(scored, batch["answer_index"], len(ids))[0]
                    self.reference_logps.update(zip(ids, (tuple(r) for r in ref.float().cpu().tolist()), strict=True))
                for r in results:
                    r["ref_chosen_logp"], r["ref_rejected_logp"] = self.reference_logps[r["id"]]
            return results
        rows = out.selected.nonzero()[:, 0]
        sums = out.losses.new_zeros(len(ids), dtype=torch.float64).index_add(0, rows, out.losses.double())
        counts = out.selected.sum(1)
        return [{"id": i, "nll_sum": float(s), "tokens": int(n)} for i, s, n in zip(ids, sums.cpu(), counts.cpu(), strict=True)]

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        if self.pairs:
            n = len(results)
            margins = [r["chosen_logp"] - r["rejected_logp"] for r in results]
            out: dict[str, float | int] = {
                "pair_accuracy": sum(m > 0 for m in margins) / n, "margin": sum(margins) / n,
                "chosen_nll": -sum(r["chosen_logp"] for r in results) / max(1, sum(r["chosen_tokens"] for r in results)),
            }
            if self.reference is not None:
                chosen = [self.beta * (r["chosen_logp"] - r["ref_chosen_logp"]) for r in results]
                rejected = [self.beta * (r["rejected_logp"] - r["ref_rejected_logp"]) for r in results]
                out.update({"rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / n,
                            "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
                            "rewards/chosen": sum(chosen) / n, "rewards/rejected": sum(rejected) / n})
            return {**out, "count": n}
        tokens = sum(r["tokens"] for r in results)
        loss = sum(r["nll_sum"] for r in results) / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "count": len(results)}
