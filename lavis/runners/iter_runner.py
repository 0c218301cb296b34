"""The iteration-based training loop (one runner for every stage and strategy)."""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lavis.common import checkpoint as ckpt
from lavis.common.config import Config
from lavis.common.optim import build_optimizer
from lavis.common.precision import autocast
from lavis.common.registry import registry
from lavis.datasets.collate import move_to
from lavis.datasets.loader import worker_batches
from lavis.datasets.stream import BatchStream, Source, StreamConfig, UnusableData, vision_patches
from lavis.models import Processors, build_model
from lavis.models.vlm import VisionLanguageModel, canonical_name
from lavis.runners.checkpointer import Checkpointer
from lavis.runners.strategies import Strategy, build_strategy, parameter_names
from lavis.tasks.evaluation import Evaluator, flat_metrics, logged_samples, table_rows
from lavis.tracking.loggers import build_loggers
from lavis.tracking.logging import MetricsWriter, NullMetricsWriter, SkipLog, append_records

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_SKIP_CHECK = 64


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for a sub-stream (a rank, a restart step), a pure function of its parts."""
    return int.from_bytes(random.Random(f"{seed}:" + ":".join(map(str, parts))).randbytes(4), "little")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StepStats:
    """What one optimiser step did, summed over every rank."""

    loss_sum: float  # summed token loss over the accumulation window
    target_tokens: int
    input_tokens: int
    samples: int
    grad_norm: torch.Tensor | None
    skip_records: list[dict[str, str]]  # this rank's skips (dataset, record id, reason, detail)
    stop: bool  # a rank was asked to stop (SIGTERM): every rank stops after this step
    tokens_per_rank: tuple[int, ...] = ()  # each rank's input (non-padding) tokens in this step
    patches_per_rank: tuple[int, ...] = ()  # each rank's vision patches in this step (see vision_patches)
    task_sums: dict[str, float] = field(default_factory=dict)  # the task's own metrics, summed like loss_sum


def max_over_mean(counts: tuple[int, ...] | list[int]) -> float | None:
    """The slowest rank's work over the mean (1.0: perfectly balanced); None when no rank had any."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else None


def window_mean(values: list[float | None]) -> float | None:
    """The mean of the defined values (None when there are none)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


class NonFiniteLoss(FloatingPointError):
    """The loss of a step was NaN or infinite on some rank; every rank stops at that step."""


@registry.register("runner", "iter_runner")
class IterRunner:
    """Trains for ``run.max_steps`` optimiser steps with accumulation, clipping, autocast,
    atomic checkpoints, exact resume, ``metrics.jsonl`` and a progress bar.

    Everything that depends on how the processes share the work (wrapping, gradient
    synchronisation, reductions, checkpoint layout) goes through ``self.strategy``; the loop is the
    same for one process, DDP and FSDP. ``self.model`` is the :class:`VisionLanguageModel`,
    ``self.wrapped`` what the strategy made of it (what the task calls).
    """

    def __init__(
        self,
        cfg: Config,
        model: VisionLanguageModel,
        processors: Processors,
        task,
        sources: list[Source],
        strategy: Strategy | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = cfg.run
        if strategy is None:
            strategy = build_strategy(self.run.strategy)
            strategy.setup(self.run.device, self.run.dist_timeout_s)
        self.strategy = strategy
        self.model = model
        self.processors = processors
        self.task = task
        self.sources = sources
        self.output_dir = Path(self.run.output_dir)
        self.checkpointer = Checkpointer(self.output_dir, self.run, self.strategy)
        self.device = self.strategy.device
        # Before the model is wrapped: what the task keeps beside it (e.g. DPO's frozen reference), placed as it is.
        self.task.setup(model, lambda module: self.strategy.prepare_reference(module, self.run.precision))
        self.wrapped = self.strategy.prepare(model, self.run.precision)
        self.optimizer = build_optimizer(self.model.components, self.run)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = registry.get("lr_scheduler", self.run.lr_scheduler)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.run.precision == "fp16" else None
        if self.strategy.world_size > 1:  # every rank built the same model from run.seed; now each draws its own
            seed_everything(derived_seed(self.run.seed, self.strategy.rank))
        self.step = 0
        self.samples_seen = 0
        self.skipped: Counter = Counter()
        # Data position: the stream state after the last batch consumed from each of this rank's workers.
        self.data_seed = self.run.seed
        self.batches_seen = 0
        self.data_states: dict[int, dict] = {}
        self._stop_requested = False
        # Evaluation during training, and the best value of run.best_metric so far.
        self.evaluator = (
            Evaluator(cfg, model, processors, strategy=self.strategy)
            if cfg.evaluation and self.run.eval_every
            else None
        )
        self.best: dict[str, Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    @property
    def global_batch(self) -> int:
        """Samples (rows, when packed) per optimiser step over all ranks."""
        return self.run.batch_size * self.run.grad_accum * self.strategy.world_size

    # ------------------------------------------------------------------ pieces of a step

    def autocast(self):
        return autocast(self.device, self.run.precision)

    def set_lr(self, step: int) -> float:
        lr = self.schedule(step, max_steps=self.run.max_steps, warmup_steps=self.run.warmup_steps, lr=self.run.lr, min_lr=self.run.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepStats:
        """One optimiser step over ``micro_batches`` (gradient accumulation).

        The loss is normalised by the task's count of the whole window on all ranks (the supervised tokens;
        DPO: the pairs), so every token weighs the same whatever the micro-batch and the rank it sits in (the strategy's
        gradient averaging over ranks is undone by ``gradient_divisor``). Before the optimiser
        steps, one reduction tells every rank the step's totals, whether some rank's loss is not
        finite (every rank then raises :class:`NonFiniteLoss`) and whether some rank was asked to stop.
        """
        strategy = self.strategy
        local_targets = sum(self.task.loss_count(b) for b in micro_batches)
        target_tokens = int(strategy.sum_over_ranks([local_targets])[0])
        normaliser = max(target_tokens, 1) / strategy.gradient_divisor
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        task_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            with strategy.no_sync(self.wrapped, sync=i == len(micro_batches) - 1), self.autocast():
                out = self.task.train_step(self.wrapped, batch)
            loss = out.loss_sum / normaliser
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += out.loss_sum.detach().double()
            for name, value in getattr(out, "metrics", {}).items():
                task_sums[name] = task_sums.get(name, 0.0) + value.detach().double()
        local_non_finite = (~torch.isfinite(loss_sum)).double()
        # Each rank's tokens and patches in a slot of its own (zeros elsewhere): the sum over ranks gathers
        # them all in the same collective, which gives the slowest rank as well as the totals.
        world, rank = strategy.world_size, strategy.rank
        per_rank = [0] * (2 * world)
        per_rank[rank] = sum(b["num_input_tokens"] for b in micro_batches)
        per_rank[world + rank] = sum(vision_patches(b.get("pixel_values")) for b in micro_batches)
        # The step's one wait for the device: the totals decide, the same on every rank, whether to go on.
        total_loss, non_finite, stop, samples, *gathered = strategy.sum_over_ranks([
            loss_sum,
            local_non_finite,
            float(self._stop_requested),
            sum(b["num_samples"] for b in micro_batches),
            *per_rank,
            *task_sums.values(),  # the same names on every rank: the task's
        ])
        tokens_per_rank = tuple(int(v) for v in gathered[:world])
        patches_per_rank = tuple(int(v) for v in gathered[world:2 * world])
        task_totals = dict(zip(task_sums, gathered[2 * world:], strict=True))
        if non_finite:
            ranks = [r for r, bad in enumerate(strategy.all_gather_object(bool(local_non_finite))) if bad]
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(
                f"non-finite loss at step {self.step + 1} on rank(s) {ranks} (of {strategy.world_size}): "
                "every rank stopped before the optimiser step; the last checkpoint is intact. Lower run.lr, "
                "check the data, or use run.precision=bf16 rather than fp16"
            )
        grad_norm = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.run.clip_grad:
            grad_norm = strategy.clip_grad_norm(self.trainable, self.run.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(
            loss_sum=total_loss,
            target_tokens=target_tokens,
            input_tokens=sum(tokens_per_rank),
            samples=int(samples),
            grad_norm=grad_norm,
            skip_records=[s for b in micro_batches for s in b["skip_records"]],
            stop=bool(stop),
            tokens_per_rank=tokens_per_rank,
            patches_per_rank=patches_per_rank,
            task_sums=task_totals,
        )

    # ------------------------------------------------------------------ data

    @property
    def num_data_workers(self) -> int:
        return max(1, self.run.num_workers)

    def data_iterator(self) -> Iterator[dict[str, Any]]:
        """This rank's batches from the configured sources, continuing from ``self.data_states``."""
        stream = BatchStream(
            self.sources,
            self.task.sample_processor(self.model, self.processors),
            self.task.collator(self.processors, self.model.llm.config._attn_implementation),
            StreamConfig(
                batch_size=self.run.batch_size,
                max_len=self.run.max_len,
                pack=self.run.pack,
                seed=self.data_seed,
                rank=self.strategy.rank,
                world_size=self.strategy.world_size,
                states=dict(self.data_states),
                worker_offset=self.batches_seen % self.num_data_workers,
                batch_tokens=self.run.batch_tokens,
                batch_patches=self.run.batch_patches,
            ),
        )
        batches = worker_batches(stream, self.run.num_workers, self.device.type == "cuda", self.run.seed)
        try:
            for batch in batches:
                UnusableData.raise_if_error(batch)
                position = batch.pop("data_state")
                self.data_states[position["worker"]] = position["state"]
                self.batches_seen += 1
                yield batch
        finally:
            batches.close()  # the workers end with the loop, however it ends

    def _check_skips(self) -> None:
        total_skipped = sum(self.skipped.values())
        attempts = self.samples_seen // self.strategy.world_size + total_skipped
        if attempts >= MIN_SAMPLES_FOR_SKIP_CHECK and total_skipped > self.run.max_skip_ratio * attempts:
            raise UnusableData(
                f"{total_skipped} of {attempts} samples were skipped ({dict(self.skipped)}), more than "
                f"run.max_skip_ratio={self.run.max_skip_ratio}: check the data"
            )

    # ------------------------------------------------------------------ checkpoints

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by checkpoint name (this rank's shards under FSDP)."""
        return self.model.named_trainable_parameters()

    def weight_names(self) -> set[str]:
        """What a checkpoint holds: the trainable parameters, or all of them (``run.save_weights``)."""
        return parameter_names(self.model) if self.run.save_weights == "full" else set(self.trainable_state())

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "weights": self.run.save_weights,
            "freeze": {name: p.describe() for name, p in self.model.freeze_policies.items()},
            "strategy": self.run.strategy.type,
        }

    def save(self) -> Path:
        """Write a resumable checkpoint of this step (every rank takes part); old ones are pruned."""
        state = {
            "step": self.step,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "data": {
                "samples_seen": self.samples_seen,
                "batches_seen": self.batches_seen,
                "num_workers": self.num_data_workers,
                "seed": self.data_seed,
            },
            "best": self.best,
        }
        rank_state = {"rng": rng_state(), "data_states": self.data_states, "skipped": dict(self.skipped)}
        path = self.checkpointer.save(self.step, self.wrapped, self.optimizer, self.weight_names(), state, rank_state,
                                      self._meta(), self.cfg.to_yaml())
        if self.is_main:
            log.info("saved checkpoint %s", path)
        return path

    def save_best(self) -> Path:
        """The weights of the best evaluation so far, in ``checkpoints/best`` (never pruned)."""
        path = self.checkpointer.save(self.step, self.wrapped, None, self.weight_names(), {"step": self.step}, None,
                                      {**self._meta(), "best": self.best}, self.cfg.to_yaml(), best=True)
        if self.is_main:
            log.info("new best %s = %.4f at step %d: saved %s", self.best["metric"], self.best["value"], self.step, path)
        return path

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, metrics: MetricsWriter | NullMetricsWriter | None = None) -> dict[str, Any]:
        """Run the configured evaluations now; log them (metrics, results table and sample predictions)
        and keep the best checkpoint by ``run.best_metric``."""
        if self.evaluator is None:
            raise ValueError("no evaluation during training: set run.eval_every and add entries under 'evaluation:'")
        results = self.evaluator.evaluate(self.output_dir, step=self.step, model_name=str(self.output_dir))
        record = {"step": self.step, **flat_metrics(results), "time": time.time()}
        if metrics is not None:
            metrics.write(record)
            metrics.log_evaluation(
                table_rows(self.cfg, results, self.evaluator.tasks), logged_samples(results, self.evaluator.samples), self.step
            )
        if self.run.best_metric:
            name, _, metric = self.run.best_metric.partition("/")
            value = float(results[name].metrics[metric])
            previous = None if self.best is None else self.best["value"]
            better = previous is None or (value > previous if self.run.best_mode == "max" else value < previous)
            if better:  # the same decision on every rank: the metrics were gathered
                self.best = {"metric": self.run.best_metric, "value": value, "step": self.step}
                self.save_best()
        return record

    def load(self, path: Path) -> None:
        """Restore weights, optimiser, RNG and data position from a checkpoint.

        A checkpoint of another world size (or layout, or strategy) restores weights and optimiser
        state; the data order then restarts from the checkpoint's step in a new deterministic order.
        """
        path = Path(path)
        shapes = {canonical_name(n): tuple(p.shape) for n, p in self.model.named_parameters()}
        self.checkpointer.check_fits(path, set(self.trainable_state()), shapes, parameter_names(self.model))
        state = self.checkpointer.load(path, self.wrapped, self.optimizer)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        data = state["data"]
        self.samples_seen = data["samples_seen"]
        self.best = state.get("best")
        ranks, world_size = state["ranks"], self.strategy.world_size
        if len(ranks) == world_size:
            if data["num_workers"] != self.num_data_workers:
                raise ckpt.CheckpointError(
                    f"{path} was written with {data['num_workers']} data workers; the data order can only be "
                    f"continued with the same number (run.num_workers={data['num_workers'] if data['num_workers'] > 1 else 0})"
                )
            mine = ranks[self.strategy.rank]
            set_rng_state(mine["rng"])
            self.skipped = Counter(mine["skipped"])
            self.data_seed = data["seed"]
            self.batches_seen = data["batches_seen"]
            self.data_states = dict(mine["data_states"])
        else:
            self.data_seed = derived_seed(self.run.seed, self.step, world_size)
            seed_everything(derived_seed(self.data_seed, self.strategy.rank))
            self.skipped, self.batches_seen, self.data_states = Counter(), 0, {}
            if self.is_main:
                log.warning(
                    "%s was written by %d ranks and this run has %d: weights and optimiser state are restored, "
                    "but the data order cannot be continued; it restarts at step %d in a new order (seeded by "
                    "run.seed, the step and the world size, so a rerun repeats it)",
                    path, len(ranks), world_size, self.step,
                )
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop

    @staticmethod
    def _new_window() -> dict[str, Any]:
        """What the steps since the last ``metrics.jsonl`` record add up."""
        return {"loss": 0.0, "tokens": 0, "input_tokens": 0, "samples": 0, "start": time.perf_counter(),
                "data_wait": 0.0, "text_balance": [], "vision_balance": [], "task": Counter()}

    def metrics_writer(self, resume_step: int | None) -> MetricsWriter | NullMetricsWriter:
        """``metrics.jsonl`` with the experiment loggers of ``run.wandb`` and ``run.tensorboard``, on the
        main process; the other ranks log nothing. ``resume_step``: the step a resumed run continues from."""
        if not self.is_main:
            return NullMetricsWriter()
        loggers = build_loggers(self.cfg, self.output_dir, resume_step)
        return MetricsWriter(self.output_dir / "metrics.jsonl", resume_step, loggers)

    def _log_skips(self, skip_log: SkipLog | None, new_skips: list[dict[str, Any]]) -> Counter:
        """Every rank's skips so far by reason; the new ones (each rank's) go to ``skipped.jsonl``."""
        gathered = self.strategy.all_gather_object((dict(self.skipped), new_skips))
        if skip_log is not None:
            skip_log.add([record for _, records in gathered for record in records])
        return sum((Counter(counts) for counts, _ in gathered), Counter())

    def _save_skips_on_failure(self, skip_log: SkipLog | None, records: list[dict[str, Any]]) -> None:
        """This rank's skips not yet in ``skipped.jsonl``, written without waiting for the other ranks."""
        records = [{"step": self.step + 1, "rank": self.strategy.rank, **r} if "step" not in r else r for r in records]
        if not records:
            return
        try:
            if skip_log is not None:
                skip_log.add(records)
            else:
                append_records(self.output_dir / "skipped.jsonl", records)
        except OSError as err:
            log.warning("could not write %d skip record(s) to %s: %s", len(records), self.output_dir / "skipped.jsonl", err)

    def _request_stop(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self._stop_requested = True

    def train(self) -> dict[str, Any]:
        """Run until ``run.max_steps``; returns the last logged metrics."""
        run = self.run
        resume = self.checkpointer.claim()  # nothing is written before a resume is checked and loaded
        self.task.before_training(self)  # on the starting weights (e.g. DPO's precomputed reference)
        if resume is not None:
            self.load(resume)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.output_dir / "config.yaml")
            log.info("parameters:\n%s", self.model.parameter_report())
            log.info(
                "global batch %d = batch_size %d x grad_accum %d x %d rank(s) (run.strategy=%s)%s",
                self.global_batch, run.batch_size, run.grad_accum, self.strategy.world_size, run.strategy.type,
                "; rows packed to run.max_len" if run.pack else "",
            )
            if run.batch_tokens is not None or run.batch_patches is not None:
                log.info("micro-batches cut by budget, per rank: run.batch_tokens=%s, run.batch_patches=%s (batch_size does "
                         "not apply%s)", run.batch_tokens, run.batch_patches, "" if run.pack else " to the samples")
        metrics = self.metrics_writer(self.step if resume is not None else None)
        skip_log = SkipLog(self.output_dir / "skipped.jsonl", self.step if resume is not None else None) if self.is_main else None
        if skip_log is not None and resume is None:  # what the builders could not use, at step 0
            for source in self.sources:
                for entry in getattr(source.data, "skipped", []):
                    skip_log.write({"step": 0, "rank": 0, "dataset": source.name, **entry})
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        self.wrapped.train()
        batches = self.data_iterator()
        # The bar only on an interactive terminal; logs and CI get one line per log_every steps instead.
        show_bar = self.is_main and sys.stderr.isatty()
        bar = tqdm(total=run.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not show_bar)
        window = self._new_window()
        first: dict[str, Any] = {}
        last: dict[str, Any] = {}
        started = time.perf_counter()
        stop = False
        new_skips: list[dict[str, Any]] = []  # this rank's, since the last log step
        try:
            while self.step < run.max_steps and not stop:
                lr = self.set_lr(self.step)
                waited = time.perf_counter()
                micro_batches = [next(batches) for _ in range(run.grad_accum)]
                window["data_wait"] += time.perf_counter() - waited
                stats = self.train_step(micro_batches)
                stop = stats.stop
                self.step += 1
                self.samples_seen += stats.samples
                self.skipped += Counter(s["reason"] for s in stats.skip_records)
                new_skips += [{"step": self.step, "rank": self.strategy.rank, **s} for s in stats.skip_records]
                self._check_skips()
                window["loss"] += stats.loss_sum
                window["tokens"] += stats.target_tokens
                window["input_tokens"] += stats.input_tokens
                window["samples"] += stats.samples
                window["task"].update(stats.task_sums)
                window["text_balance"].append(max_over_mean(stats.tokens_per_rank))
                window["vision_balance"].append(max_over_mean(stats.patches_per_rank))
                bar.update(1)
                if self.step % run.log_every == 0 or self.step == run.max_steps:
                    elapsed = time.perf_counter() - window["start"]
                    skipped = self._log_skips(skip_log, new_skips)
                    new_skips = []
                    last = {
                        "step": self.step,
                        "loss": window["loss"] / max(window["tokens"], 1),
                        # the task's own metrics, per unit of its loss count (DPO: per pair)
                        **{name: value / max(window["tokens"], 1) for name, value in window["task"].items()},
                        "lr": lr,
                        "grad_norm": float(stats.grad_norm) if stats.grad_norm is not None else None,
                        "tokens_per_s": window["input_tokens"] / elapsed,
                        "samples_per_s": window["samples"] / elapsed,
                        # the share of the window's wall time spent blocked on the data loader (its workers behind)
                        "data_wait_share": min(window["data_wait"] / elapsed, 1.0),
                        # the slowest rank's work over the mean, per step, averaged over the steps since the last record
                        "text_tokens_max_over_mean": window_mean(window["text_balance"]),
                        "vision_patches_max_over_mean": window_mean(window["vision_balance"]),
                        "skipped": sum(skipped.values()),
                        "skipped_by_reason": dict(skipped),
                        "time": time.time(),
                    }
                    metrics.write(last)
                    first = first or last
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                    if not show_bar and self.is_main:
                        log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f",
                                 self.step, run.max_steps, last["loss"], lr, last["tokens_per_s"])
                    window = self._new_window()
                if self.evaluator is not None and (self.step % run.eval_every == 0 or self.step == run.max_steps):
                    self.evaluate(metrics)
                if self.step % run.save_every == 0 or self.step == run.max_steps or stop:
                    self.save()
            self._log_skips(skip_log, new_skips)  # those since the last log step (a stop on a signal)
        except BaseException as err:  # an error or an interrupt: keep the skips that may have led to it
            self._save_skips_on_failure(skip_log, new_skips + getattr(err, "skip_records", []))
            raise
        finally:
            batches.close()  # stops the data workers now, not at interpreter exit
            bar.close()
            metrics.close()
            if skip_log is not None:
                skip_log.close()
            signal.signal(signal.SIGTERM, previous_handler)
        if stop and self.is_main:
            log.warning("stopped at step %d on a signal; continue with run.resume=auto", self.step)
        if self.skipped:
            log.warning("skipped samples by reason: %s", dict(self.skipped))
        if first and self.is_main:
            log.info(
                "trained to step %d in %.0f s; loss %.4f (step %d) -> %.4f (step %d); metrics in %s",
                self.step, time.perf_counter() - started, first["loss"], first["step"], last["loss"], last["step"],
                self.output_dir / "metrics.jsonl",
            )
        return last


def build_runner(cfg: Config, strategy: Strategy | None = None) -> IterRunner:
    """Config -> strategy (joined), task, model, processors, dataset -> the configured runner."""
    if strategy is None:
        strategy = build_strategy(cfg.run.strategy)
        strategy.setup(cfg.run.device, cfg.run.dist_timeout_s)
    seed_everything(cfg.run.seed)
    task = registry.get("task", cfg.run.task)(cfg)
    model, processors = build_model(cfg.model, meta=strategy.builds_on_meta)
    sources = task.build_sources()
    runner_cls = registry.get("runner", cfg.run.runner)
    return runner_cls(cfg, model, processors, task, sources, strategy=strategy)
