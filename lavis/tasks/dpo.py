"""Direct preference optimisation (``run.task: dpo``): the sigmoid DPO loss over preference pairs, on the
runner, strategies, freeze policies and data stream of the other stages.

A preference record (what the preference builders write; ``image_root`` is added by ``RecordDataset``)::

    {"id": str,
     "messages": [ChatML turns {"role", "content"}, ending with the user turn the answers reply to;
                  pictures inline as "Picture n: <img>path</img>\\n" or "<img>path</img>", videos as
                  "<video>path</video>"],
     "chosen": str, "rejected": str,
     "ref_chosen_logp": float, "ref_rejected_logp": float}   # optional: the reference's, precomputed

One row per pair (:class:`PairProcessor`, :class:`PairCollator`): the prompt once, its pictures through the
visual path once, then the chosen answer, then the rejected one, which attends to the prompt and to itself
but not to the chosen answer, its positions continuing from the prompt's end as if the chosen answer were
absent (the collator's shared-prefix mask; M-RoPE positions follow from the 1-D ones as for any sample).
The prompt's last token is written once per answer (its hidden state is the same in each copy), so that
each answer's first token is predicted from its own copy with the usual one-token shift. The row is thus
exactly the two answers run separately (tests: loss and every gradient within 1e-5). Several pairs share
a row under ``run.pack``, isolated from each other as SFT samples are. Under flash-attention (whose varlen
kernel cannot express a shared prefix) each pair runs as two samples, its pictures encoded twice.

Loss per pair, as TRL's ``DPOTrainer.dpo_loss`` (``loss_type="sigmoid"``): with policy and reference
log-probabilities summed over each answer's tokens (its closing ``<|im_end|>`` included) and
``z = beta * ((chosen - rejected) - (ref_chosen - ref_rejected))``,
``-logsigmoid(z) * (1 - label_smoothing) - logsigmoid(-z) * label_smoothing``, plus ``sft_weight`` x the
chosen answer's mean token NLL (RPO / MPO's generation term). The runner divides the summed loss by the
pairs of the whole step on every rank, so gradient accumulation and ranks reduce exactly.
``metrics.jsonl`` adds, per pair: ``rewards/chosen``, ``rewards/rejected`` (``beta x`` log-ratio to the
reference), ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``nll_loss``.

Reference (``run.dpo.reference``): ``frozen_copy``, a copy of the starting model, frozen, placed as the
strategy places the policy (sharded under FSDP); ``adapters_off``, a LoRA policy with its adapters switched
off (no second copy); ``precomputed``, the records' ``ref_chosen_logp`` / ``ref_rejected_logp``.
``run.dpo.precompute_ref: true`` computes them once before the first step with the starting model (adapters
off under ``adapters_off``), keeps no reference in memory, and caches them by record id in
``<output_dir>/reference_logps.json``, which a resumed run reads instead of computing them again, or in
``run.dpo.reference_file``, shared by runs (an ablation of ``beta``, say). Saved with them: what they depend on
(starting weights, model, encoding, precision, annotation files); a cache computed for another is refused.

Named skips, counted as for SFT: ``identical_answers``; ``too_long`` (prompt and both answers over
``run.max_len``: one row holds the pair); ``image_in_answer``; ``no_reference_logp``; ``malformed_pair``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.collate import PackCollator
from lavis.datasets.stream import Source
from lavis.models import Processors
from lavis.models.vlm import TokenLosses, VisionLanguageModel
from lavis.processors.conversation import IGNORE_INDEX, VISUAL_SPAN, ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.sample import SampleProcessor
from lavis.tasks.sft import LanguageModelingTask

log = logging.getLogger(__name__)

REFERENCE_CACHE = "reference_logps.json"  # run.output_dir's: {"reference": what they depend on, "logps": {id: [chosen, rejected]}}
CHOSEN, REJECTED = 0, 1


@dataclass
class PreferenceLoss:
    """A micro-batch's summed loss over its pairs, their number, and the task's metrics (sums over pairs)."""

    loss_sum: torch.Tensor
    num_pairs: int
    metrics: dict[str, torch.Tensor]


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss ``[N]`` and the implicit rewards ``[N, 2]`` (detached) from the summed
    log-probabilities ``[N, 2]`` (chosen, rejected) of the policy and the reference."""
    logits = (policy[:, CHOSEN] - policy[:, REJECTED]) - (reference[:, CHOSEN] - reference[:, REJECTED])
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * (policy - reference).detach()


def answer_logps(out: TokenLosses, answer_index: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's summed log-probability ``[N, 2]`` and its token count ``[N, 2]``, from the model's per-token
    losses (``reduction="none"``) and the batch's ``answer_index`` (``2 x pair + answer`` at each answer token)."""
    index = answer_index[:, 1:][out.selected]
    if (index < 0).any():
        raise ValueError("a supervised token outside every answer: the batch was not made by PairCollator")
    logps = out.losses.new_zeros(2 * num_pairs).index_add(0, index, -out.losses)
    return logps.view(num_pairs, 2), torch.bincount(index, minlength=2 * num_pairs).view(num_pairs, 2)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, disabled: bool = True) -> Iterator[None]:
    """The model's LoRA adapters switched off for the duration (the base weights alone). peft's own
    ``enable_adapters`` also changes ``requires_grad``, which the optimiser's parameters must keep: the
    layers' flag is set instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if disabled else []
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer._disable_adapters = state


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the duration, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class PairProcessor(SampleProcessor):
    """A preference record -> one pair sample: ``input_ids`` = prompt without its last token, then that token
    and the chosen answer (branch 1), then that token again and the rejected answer (branch 2); ``labels``
    (the answers' tokens), ``branch`` and ``position_ids`` (for :class:`PackCollator`), ``answer`` (0 / 1 at
    the chosen / rejected tokens, -1 elsewhere), ``pixel_values``, ``ref_logps`` ``[2]`` (NaN: none),
    ``prompt_len`` and ``id``.

    ``references``: precomputed reference log-probabilities by record id; ``reference_fields``: read them
    from the records' ``ref_chosen_logp`` / ``ref_rejected_logp``.
    """

    def __init__(self, encoder: ConversationEncoder, image_processor: Callable, video_processor: Callable | None = None,
                 references: dict[str, list[float]] | None = None, reference_fields: bool = False) -> None:
        super().__init__(encoder, image_processor, truncate=False, video_processor=video_processor)
        self.references = references
        self.reference_fields = reference_fields

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        messages, chosen, rejected = record.get("messages"), record.get("chosen"), record.get("rejected")
        if not messages or not isinstance(chosen, str) or not isinstance(rejected, str):
            raise SkipSample("malformed_pair", "a preference record has messages, chosen and rejected")
        if messages[-1].get("role") != "user":
            raise SkipSample("malformed_pair", "the messages end with the user turn that the answers reply to")
        if chosen.strip() == rejected.strip():
            raise SkipSample("identical_answers", f"chosen and rejected are the same answer: {chosen[:80]!r}")
        answers = [self.answer_ids(text) for text in (chosen, rejected)]
        reference = self.reference_of(record)
        process = self.loader(record)
        images = None if isinstance(self.encoder.num_image_tokens, int) else process
        prompt = self.encoder.encode_messages(messages, add_generation_prompt=True, images=images)
        p, (c, r) = len(prompt.input_ids), map(len, answers)
        if p + 1 + c + r > self.encoder.max_len:
            raise SkipSample("too_long", f"prompt {p} + chosen {c} + rejected {r} tokens (+1) > max_len "
                                         f"{self.encoder.max_len}: one row holds the pair")
        processed = prompt.processed if images is not None else [process(path) for path in prompt.images]
        last = prompt.input_ids[-1:]
        ids = prompt.input_ids + answers[CHOSEN] + last + answers[REJECTED]
        labels = [IGNORE_INDEX] * p + answers[CHOSEN] + [IGNORE_INDEX] + answers[REJECTED]
        branch = [0] * (p - 1) + [1] * (1 + c) + [2] * (1 + r)
        positions = [*range(p), *range(p, p + c), *range(p - 1, p + r)]
        answer = [-1] * p + [CHOSEN] * c + [-1] + [REJECTED] * r
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "branch": torch.tensor(branch, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "answer": torch.tensor(answer, dtype=torch.long),
            "pixel_values": self.image_processor.batch(processed),
            "ref_logps": torch.tensor(reference, dtype=torch.float32),
            "prompt_len": p,
            "id": str(record.get("id", "")),
        }

    def answer_ids(self, text: str) -> list[int]:
        """An answer's tokens and its closing ``<|im_end|>``, all supervised."""
        if VISUAL_SPAN.search(text):
            raise SkipSample("image_in_answer", f"a picture or video in an answer: {text[:80]!r}")
        return self.encoder.encode_text(text, supervised=True).input_ids + [self.encoder.tok.im_end_id]

    def reference_of(self, record: dict[str, Any]) -> list[float]:
        if self.references is not None:
            value = self.references.get(str(record.get("id")))
            if value is None:
                raise SkipSample("no_reference_logp", f"record {record.get('id')!r} is not in the precomputed reference")
            return list(value)
        if not self.reference_fields:
            return [math.nan, math.nan]
        if "ref_chosen_logp" not in record or "ref_rejected_logp" not in record:
            raise SkipSample("no_reference_logp", "run.dpo.reference=precomputed: no ref_chosen_logp / ref_rejected_logp")
        return [float(record["ref_chosen_logp"]), float(record["ref_rejected_logp"])]


class PairCollator:
    """Pair samples (unpacked: a list; packed: rows of them) -> a batch of :class:`PackCollator` with
    ``answer_index`` ``[B, L]`` (``2 x pair + answer`` at each answer token, -1 elsewhere), ``ref_logps``
    ``[pairs, 2]``, ``pair_ids`` and ``num_samples`` = pairs.

    ``shared_prompt``: one row segment per pair (the prompt and its pictures once; ``block_mask`` only);
    otherwise each pair is two samples, prompt + chosen and prompt + rejected (the pictures twice), each in a
    row of its own when unpacked.
    """

    def __init__(self, pad_id: int, isolation: str = "block_mask", shared_prompt: bool = True) -> None:
        self.pack = PackCollator(pad_id=pad_id, isolation=isolation)
        self.shared_prompt = shared_prompt and isolation == "block_mask"

    def __call__(self, batch: list[dict[str, Any]] | list[list[dict[str, Any]]]) -> dict[str, Any]:
        unpacked = isinstance(batch[0], dict)  # then every sample has a row of its own
        pairs = list(batch) if unpacked else [pair for row in batch for pair in row]
        rows, tags, first = [], [], 0  # the samples of each row, their answer tags; the row's first pair
        for row in [[pair] for pair in batch] if unpacked else batch:
            laid_out = [(sample, self.tag(sample.pop("answer"), first + i)) for i, pair in enumerate(row)
                        for sample in self.layout(pair)]
            first += len(row)
            groups = [[item] for item in laid_out] if unpacked else [laid_out]
            rows += [[sample for sample, _ in group] for group in groups]
            tags += [torch.cat([tag for _, tag in group]) for group in groups]
        out = self.pack(rows)
        out["answer_index"] = torch.full_like(out["labels"], -1)
        for r, row_tags in enumerate(tags):
            out["answer_index"][r, : len(row_tags)] = row_tags
        out["ref_logps"] = torch.stack([pair["ref_logps"] for pair in pairs])
        out["pair_ids"] = [pair["id"] for pair in pairs]
        out["num_samples"] = len(pairs)
        return out

    @staticmethod
    def tag(answer: torch.Tensor, pair: int) -> torch.Tensor:
        """A sample's answer tags (0 / 1, -1) as indices into the batch's answers: ``2 x pair + answer``."""
        return torch.where(answer >= 0, answer + 2 * pair, answer)

    def layout(self, pair: dict[str, Any]) -> list[dict[str, Any]]:
        """The samples a pair is collated as: itself (shared prompt), or its two answers each after the prompt."""
        keys = ("input_ids", "labels", "pixel_values", "answer")
        if self.shared_prompt:
            return [{k: pair[k] for k in (*keys, "branch", "position_ids")}]
        samples = []
        for branch in (1, 2):  # the shared prefix (the prompt but its last token), then the branch: that token's copy and the answer
            kept = (pair["branch"] == 0) | (pair["branch"] == branch)
            sample = {k: pair[k][kept] for k in ("input_ids", "labels", "answer")}
            samples.append({**sample, "pixel_values": pair["pixel_values"]})
        return samples


@registry.register("task", "dpo")
class DPOTask(LanguageModelingTask):
    """DPO over preference pairs (see the module notes); settings in ``run.dpo``."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.options = cfg.run.dpo
        self.policy: nn.Module | None = None  # the unwrapped model (whose adapters are switched off)
        self.reference: nn.Module | None = None  # the frozen copy, placed by the strategy
        self.references: dict[str, list[float]] | None = None  # precomputed, by record id

    @property
    def precomputed(self) -> bool:
        return self.options.precompute_ref or self.options.reference == "precomputed"

    def sample_processor(self, model: VisionLanguageModel, processors: Processors) -> PairProcessor:
        run = self.cfg.run
        encoder = ConversationEncoder(
            processors.tokenizer, model.image_tokens, self.cfg.model.system_message, run.max_len, run.label_policy
        )
        return PairProcessor(encoder, processors.image, processors.video, references=self.references,
                             reference_fields=self.options.reference == "precomputed")

    def collator(self, processors: Processors, attn_implementation: str) -> PairCollator:
        isolation = "cu_seqlens" if attn_implementation.startswith("flash_attention") else "block_mask"
        if isolation == "cu_seqlens":
            log.warning("dpo under %s: each pair runs as two samples (the prompt and its pictures twice); "
                        "attention 'sdpa' shares them in one row", attn_implementation)
        return PairCollator(processors.tokenizer.pad_id, isolation)

    def build_sources(self) -> list[Source]:
        """The datasets, each record checked now to be a preference pair (and to hold the reference's
        log-probabilities under ``run.dpo.reference=precomputed``)."""
        sources = super().build_sources()
        needed = ["chosen", "rejected"]
        if self.options.reference == "precomputed":
            needed += ["ref_chosen_logp", "ref_rejected_logp"]
        for source in sources:
            for record in getattr(source.data, "records", ()):
                missing = [key for key in needed if key not in record]
                if missing:
                    way_out = ("; compute them with run.dpo.precompute_ref=true and run.dpo.reference=frozen_copy"
                               if "ref_chosen_logp" in missing else "; run.task=dpo trains on preference pairs")
                    raise AnnotationError(f"datasets.{source.name}: record {record.get('id')!r} has no "
                                          f"{' / '.join(missing)}{way_out}")
        return sources

    def setup(self, model: VisionLanguageModel, place: Callable[[nn.Module], nn.Module]) -> None:
        """Keep the policy; under ``frozen_copy`` (computed every step), copy the starting model, frozen."""
        self.policy = model
        if self.options.reference == "frozen_copy" and not self.options.precompute_ref:
            reference = copy.deepcopy(model).requires_grad_(False).eval()
            self.reference = place(reference).eval()

    def loss_count(self, batch: dict[str, Any]) -> int:
        """The runner normalises by the pairs of the step."""
        return int(batch["num_samples"])

    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's summed log-probabilities ``[pairs, 2]`` for the batch (no gradient)."""
        if self.precomputed:
            reference = batch["ref_logps"]
            if reference.isnan().any():
                raise ValueError("a pair without reference log-probabilities reached the loss (run.dpo.reference)")
            return reference
        scorer = self.reference if self.reference is not None else model
        off = self.options.reference == "adapters_off"
        with torch.no_grad(), evaluating(scorer), adapters_disabled(self.policy or model, off):
            out = scorer(**self.inputs(batch), reduction="none")
        return answer_logps(out, batch["answer_index"], batch["num_samples"])[0]

    def train_step(self, model: nn.Module, batch: dict[str, Any]) -> PreferenceLoss:
        """The micro-batch's summed DPO loss over its pairs, through the model's ``forward``."""
        pairs = batch["num_samples"]
        reference = self.reference_logps(model, batch)
        policy, tokens = answer_logps(model(**self.inputs(batch), reduction="none"), batch["answer_index"], pairs)
        losses, rewards = dpo_losses(policy, reference, self.options.beta, self.options.label_smoothing)
        metrics = {
            "rewards/chosen": rewards[:, CHOSEN].sum(),
            "rewards/rejected": rewards[:, REJECTED].sum(),
            "rewards/margins": (rewards[:, CHOSEN] - rewards[:, REJECTED]).sum(),
            "rewards/accuracies": (rewards[:, CHOSEN] > rewards[:, REJECTED]).float().sum(),
            "logps/chosen": policy[:, CHOSEN].detach().sum(),
            "logps/rejected": policy[:, REJECTED].detach().sum(),
        }
        if self.options.sft_weight:
            nll = -policy[:, CHOSEN] / tokens[:, CHOSEN].clamp(min=1)
            losses = losses + self.options.sft_weight * nll
            metrics["nll_loss"] = nll.detach().sum()
        return PreferenceLoss(loss_sum=losses.sum(), num_pairs=pairs, metrics=metrics)

    # ------------------------------------------------------------------ precomputed reference

    def before_training(self, runner: Any) -> None:
        """``run.dpo.precompute_ref``: the reference log-probabilities of every pair, read from the cache
        (``run.dpo.reference_file``, else ``<output_dir>/reference_logps.json``) when it was computed for the same
        reference, or computed now with the starting weights (before a checkpoint is loaded) and saved there."""
        if not self.options.precompute_ref:
            return
        shared = self.options.reference_file is not None
        path = Path(self.options.reference_file) if shared else Path(runner.output_dir) / REFERENCE_CACHE
        identity = self.reference_identity()
        if path.exists():
            self.references = read_reference_cache(path, identity, "run.dpo.reference_file" if shared else "its run")
            log.info("dpo: reference log-probabilities of %d pairs read from %s", len(self.references), path)
            return
        self.references = self.compute_references(runner)
        if runner.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".tmp{os.getpid()}")
            temporary.write_text(json.dumps({"reference": identity, "logps": self.references}))
            os.replace(temporary, path)
            log.info("dpo: reference log-probabilities of %d pairs computed and saved to %s", len(self.references), path)
        runner.strategy.barrier()

    def reference_identity(self) -> dict[str, Any]:
        """What the precomputed log-probabilities depend on, saved with them: the starting weights (path, size,
        time), the model's config but its freeze policies (which change the trained, not the reference), how the
        reference is taken, the encoding (``max_len``, ``label_policy``), the precision, and each dataset's
        annotation file (path, size, time)."""
        from lavis.models.weights import resolve_weights_path

        cfg = self.cfg
        model = {k: v for k, v in cfg.raw["model"].items() if k not in ("freeze", "load_from", "override")}
        weights = None
        if cfg.model.load_from:
            weights = file_stamp(resolve_weights_path(cfg.model.load_from))
        datasets = {name: file_stamp(Path(d.params["ann_path"])) for name, d in sorted(cfg.datasets.items())
                    if isinstance(d.params.get("ann_path"), str)}
        return json.loads(json.dumps({
            "weights": weights, "model": model, "reference": self.options.reference, "max_len": cfg.run.max_len,
            "label_policy": cfg.run.label_policy, "precision": cfg.run.precision, "datasets": datasets,
        }))  # as it reads back from the file

    def compute_references(self, runner: Any) -> dict[str, list[float]]:
        """Every pair of every dataset through the model as it starts (every rank all of them: under FSDP the
        ranks' collectives must match), ``run.batch_size`` pairs at a time."""
        processor = self.sample_processor(runner.model, runner.processors)
        collate = self.collator(runner.processors, runner.model.llm.config._attn_implementation)
        table: dict[str, list[float]] = {}
        seen: dict[str, str] = {}
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            if not pending:
                return
            batch = runner.to_device(collate(pending))
            off = self.options.reference == "adapters_off"
            with runner.autocast(), torch.no_grad(), evaluating(runner.wrapped), adapters_disabled(runner.model, off):
                out = runner.wrapped(**self.inputs(batch), reduction="none")
                values = answer_logps(out, batch["answer_index"], batch["num_samples"])[0]
            table.update(zip(batch["pair_ids"], values.float().tolist(), strict=True))
            pending.clear()

        for source in runner.sources:
            if not hasattr(source.data, "records"):
                raise ConfigError(f"run.dpo.precompute_ref: datasets.{source.name} is streamed and cannot be read ahead; "
                                 "set run.dpo.precompute_ref=false (a frozen copy computes the reference every step)")
            for i in range(len(source.data)):
                record = source.data[i]
                key = str(record.get("id"))
                if key in seen:
                    raise AnnotationError(f"run.dpo.precompute_ref: record id {key!r} is in datasets.{seen[key]} and "
                                          f"datasets.{source.name}: the reference is kept by id, ids must be unique")
                seen[key] = source.name
                try:
                    pending.append(processor(record))
                except SkipSample:
                    continue  # the stream skips it again, and counts it
                if len(pending) == self.cfg.run.batch_size:
                    flush()
        flush()
        return table


def file_stamp(path: Path) -> dict[str, Any]:
    """A file's (or a sharded weights directory's) absolute path, size and modification time: what tells a
    rewritten file from the one a cache was computed from."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return {"path": str(path.resolve()), "bytes": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


def read_reference_cache(path: Path, identity: dict[str, Any], owner: str) -> dict[str, list[float]]:
    """The log-probabilities of a reference cache, refused (naming what differs) when they were computed for
    another reference: other weights, model, encoding, precision or data."""
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or "reference" not in saved or "logps" not in saved:
        raise ConfigError(f"{path}: not a reference cache of this version (no 'reference' / 'logps'); delete it to "
                         "compute the reference again")
    was = saved["reference"]
    differ = sorted(key for key in identity.keys() | was.keys() if identity.get(key) != was.get(key))
    if differ:
        then = ", ".join(f"{key}={was.get(key)}" for key in differ)
        raise ConfigError(f"{path} ({owner}) holds reference log-probabilities computed with another {', '.join(differ)} "
                         f"(saved: {then[:400]}); delete it to compute them again, or set run.dpo.reference_file to "
                         "another file")
    return saved["logps"]

