"""The iteration-based training loop (one runner for every stage and strategy)."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lavis.common import checkpoint as ckpt
from lavis.common.config import Config
from lavis.common.logging import MetricsWriter, init_wandb
from lavis.common.precision import autocast
from lavis.common.optim import build_optimizer
from lavis.common.registry import registry
from lavis.datasets.stream import BatchStream, Source, StreamConfig
from lavis.models import Processors, build_model
from lavis.models.vlm import VisionLanguageModel
from lavis.processors.conversation import IGNORE_INDEX
from lavis.tasks.evaluation import Evaluator, flat_metrics

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_SKIP_CHECK = 64


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """What one optimiser step did."""

    loss_sum: torch.Tensor  # summed token loss over the accumulation window
    target_tokens: int
    input_tokens: int
    samples: int
    grad_norm: torch.Tensor | None
    skipped: Counter


@registry.register("runner", "iter_runner")
class IterRunner:
    """Trains for ``run.max_steps`` optimiser steps with accumulation, clipping, autocast,
    atomic checkpoints, exact resume, ``metrics.jsonl`` and a progress bar.

    Device placement, gradient synchronisation and sharding go through the ``strategy``
    methods (``_wrap``, ``_no_sync``, ``_all_reduce``) so distributed strategies slot in here.
    """

    def __init__(self, cfg: Config, model: VisionLanguageModel, processors: Processors, task, sources: list[Source]) -> None:
        self.cfg = cfg
        self.run = cfg.run
        self.model = model
        self.processors = processors
        self.task = task
        self.sources = sources
        self.output_dir = Path(self.run.output_dir)
        self.device = torch.device(self.run.device if self.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model.components, self.run)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = registry.get("lr_scheduler", self.run.lr_scheduler)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.run.precision == "fp16" else None
        self.step = 0
        self.samples_seen = 0
        self.skipped: Counter = Counter()
        # Data position: the stream state after the last batch consumed from each worker.
        self.batches_seen = 0
        self.data_states: dict[int, dict] = {}
        self._stop_requested = False
        # Evaluation during training, and the best value of run.best_metric so far.
        self.evaluator = Evaluator(cfg, model, processors) if cfg.evaluation and self.run.eval_every else None
        self.best: dict[str, Any] | None = None

    # ------------------------------------------------------------------ strategy hooks

    def _no_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()

    def _all_reduce(self, value: int) -> int:
        return value

    @property
    def is_main(self) -> bool:
        return True

    # ------------------------------------------------------------------ pieces of a step

    def autocast(self):
        return autocast(self.device, self.run.precision)

    def set_lr(self, step: int) -> float:
        lr = self.schedule(step, max_steps=self.run.max_steps, warmup_steps=self.run.warmup_steps, lr=self.run.lr, min_lr=self.run.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        def move(value):
            if torch.is_tensor(value):
                return value.to(self.device, non_blocking=True)
            return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value

        return move(batch)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepStats:
        """One optimiser step over ``micro_batches`` (gradient accumulation).

        The loss is normalised by the supervised tokens of the whole window (all ranks), so every
        token weighs the same whatever the micro-batch it sits in.
        """
        target_tokens = self._all_reduce(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches))
        normaliser = max(target_tokens, 1)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            with self._no_sync(i == len(micro_batches) - 1), self.autocast():
                out = self.task.train_step(self.model, batch)
            loss = out.loss_sum / normaliser
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += out.loss_sum.detach().float()
        grad_norm = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.run.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.run.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(
            loss_sum=loss_sum,
            target_tokens=target_tokens,
            input_tokens=sum(b["num_input_tokens"] for b in micro_batches),
            samples=sum(b["num_samples"] for b in micro_batches),
            grad_norm=grad_norm,
            skipped=sum((b["skipped"] for b in micro_batches), Counter()),
        )

    # ------------------------------------------------------------------ data

    @property
    def num_data_workers(self) -> int:
        return max(1, self.run.num_workers)

    def data_iterator(self) -> Iterator[dict[str, Any]]:
        """Batches from the configured sources, continuing from ``self.data_states``."""
        stream = BatchStream(
            self.sources,
            self.task.sample_processor(self.model, self.processors),
            self.task.collator(self.processors, self.model.llm.config._attn_implementation),
            StreamConfig(
                batch_size=self.run.batch_size,
                max_len=self.run.max_len,
                pack=self.run.pack,
                seed=self.run.seed,
                states=dict(self.data_states),
                worker_offset=self.batches_seen % self.num_data_workers,
            ),
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.run.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.run.num_workers > 0,
            prefetch_factor=4 if self.run.num_workers > 0 else None,
            # Its own generator: creating the iterator must not draw from the global RNG, whose state a
            # resume has just restored (dropout after a resume would differ from an uninterrupted run).
            generator=torch.Generator().manual_seed(self.run.seed),
        )
        for batch in loader:
            position = batch.pop("data_state")
            self.data_states[position["worker"]] = position["state"]
            self.batches_seen += 1
            yield batch

    def _check_skips(self) -> None:
        total_skipped = sum(self.skipped.values())
        attempts = self.samples_seen + total_skipped
        if attempts >= MIN_SAMPLES_FOR_SKIP_CHECK and total_skipped > self.run.max_skip_ratio * attempts:
            raise RuntimeError(
                f"{total_skipped} of {attempts} samples were skipped ({dict(self.skipped)}), more than "
                f"run.max_skip_ratio={self.run.max_skip_ratio}: check the data"
            )

    # ------------------------------------------------------------------ checkpoints

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        if self.run.save_weights == "full":
            return dict(self.model.named_parameters())
        return self.trainable_state()

    def save(self) -> Path:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(),
            "data": {
                "samples_seen": self.samples_seen,
                "skipped": dict(self.skipped),
                "batches_seen": self.batches_seen,
                "num_workers": self.num_data_workers,
                "states": self.data_states,
            },
            "best": self.best,
        }
        meta = {"step": self.step, "weights": self.run.save_weights, "freeze": self.model.freeze_policies}
        path = ckpt.save_checkpoint(ckpt.checkpoint_dir(self.output_dir, self.step), self.weights_to_save(), state, meta)
        ckpt.prune_checkpoints(self.output_dir, self.run.keep_last)
        log.info("saved checkpoint %s", path)
        return path

    def save_best(self) -> Path:
        """The weights of the best evaluation so far, in ``checkpoints/best`` (never pruned)."""
        meta = {"step": self.step, "weights": self.run.save_weights, "freeze": self.model.freeze_policies, "best": self.best}
        path = ckpt.save_checkpoint(self.output_dir / "checkpoints" / "best", self.weights_to_save(), {"step": self.step}, meta)
        log.info("new best %s = %.4f at step %d: saved %s", self.best["metric"], self.best["value"], self.step, path)
        return path

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, metrics: MetricsWriter | None = None) -> dict[str, Any]:
        """Run the configured evaluations now; log them and keep the best checkpoint by ``run.best_metric``."""
        if self.evaluator is None:
            raise ValueError("no evaluation during training: set run.eval_every and add entries under 'evaluation:'")
        results = self.evaluator.evaluate(self.output_dir, step=self.step, model_name=str(self.output_dir))
        record = {"step": self.step, **flat_metrics(results), "time": time.time()}
        if metrics is not None:
            metrics.write(record)
        if self.run.best_metric:
            name, _, metric = self.run.best_metric.partition("/")
            value = float(results[name].metrics[metric])
            previous = None if self.best is None else self.best["value"]
            better = previous is None or (value > previous if self.run.best_mode == "max" else value < previous)
            if better:
                self.best = {"metric": self.run.best_metric, "value": value, "step": self.step}
                if self.is_main:
                    self.save_best()
        return record

    def resume_path(self) -> Path | None:
        if self.run.resume is None:
            return None
        if self.run.resume == "auto":
            found = ckpt.list_checkpoints(self.output_dir)
            return found[-1] if found else None
        return Path(self.run.resume)

    def load(self, path: Path) -> None:
        """Restore trainable weights, optimiser, RNG and data position from a checkpoint."""
        weights, state, meta = ckpt.load_checkpoint(path)
        expected = set(self.trainable_state())
        allowed = expected | (set(dict(self.model.named_parameters())) if meta["weights"] == "full" else set())
        missing, unexpected = expected - set(weights), set(weights) - allowed
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the trainable parameters: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was the freeze policy changed?)"
            )
        self.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        data = state["data"]
        if data["num_workers"] != self.num_data_workers:
            raise ValueError(
                f"{path} was written with {data['num_workers']} data workers; the data order can only be "
                f"continued with the same number (run.num_workers={data['num_workers'] if data['num_workers'] > 1 else 0})"
            )
        self.samples_seen = data["samples_seen"]
        self.skipped = Counter(data["skipped"])
        self.batches_seen = data["batches_seen"]
        self.data_states = dict(data["states"])
        self.best = state.get("best")
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop

    def _request_stop(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self._stop_requested = True

    def train(self) -> dict[str, Any]:
        """Run until ``run.max_steps``; returns the last logged metrics."""
        run = self.run
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.output_dir / "config.yaml")
        log.info("parameters:\n%s", self.model.parameter_report())
        resume = self.resume_path()
        if resume is not None:
            self.load(resume)
        metrics = MetricsWriter(
            self.output_dir / "metrics.jsonl",
            resume_step=self.step if resume is not None else None,
            mirror=init_wandb(self.run.wandb, self.cfg.raw, self.output_dir) if self.is_main else None,
        )
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        self.model.train()
        batches = self.data_iterator()
        # The bar only on an interactive terminal; logs and CI get one line per log_every steps instead.
        show_bar = self.is_main and sys.stderr.isatty()
        bar = tqdm(total=run.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not show_bar)
        window = {"loss": 0.0, "tokens": 0, "input_tokens": 0, "samples": 0, "start": time.perf_counter()}
        first: dict[str, Any] = {}
        last: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            while self.step < run.max_steps and not self._stop_requested:
                lr = self.set_lr(self.step)
                stats = self.train_step([next(batches) for _ in range(run.grad_accum)])
                self.step += 1
                self.samples_seen += stats.samples
                self.skipped += stats.skipped
                self._check_skips()
                window["loss"] += stats.loss_sum  # a tensor: no device sync until the log line
                window["tokens"] += stats.target_tokens
                window["input_tokens"] += stats.input_tokens
                window["samples"] += stats.samples
                bar.update(1)
                if self.step % run.log_every == 0 or self.step == run.max_steps:
                    elapsed = time.perf_counter() - window["start"]
                    last = {
                        "step": self.step,
                        "loss": float(window["loss"]) / max(window["tokens"], 1),
                        "lr": lr,
                        "grad_norm": float(stats.grad_norm) if stats.grad_norm is not None else None,
                        "tokens_per_s": window["input_tokens"] / elapsed,
                        "samples_per_s": window["samples"] / elapsed,
                        "skipped": sum(self.skipped.values()),
                        "skipped_by_reason": dict(self.skipped),
                        "time": time.time(),
                    }
                    metrics.write(last)
                    first = first or last
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                    if not show_bar and self.is_main:
                        log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", self.step, run.max_steps, last["loss"], lr, last["tokens_per_s"])
                    window = {"loss": 0.0, "tokens": 0, "input_tokens": 0, "samples": 0, "start": time.perf_counter()}
                if self.evaluator is not None and (self.step % run.eval_every == 0 or self.step == run.max_steps):
                    self.evaluate(metrics)
                if self.step % run.save_every == 0 or self.step == run.max_steps or self._stop_requested:
                    self.save()
        finally:
            bar.close()
            metrics.close()
            signal.signal(signal.SIGTERM, previous_handler)
        if self.skipped:
            log.warning("skipped samples by reason: %s", dict(self.skipped))
        if first and self.is_main:
            log.info(
                "trained to step %d in %.0f s; loss %.4f (step %d) -> %.4f (step %d); metrics in %s",
                self.step, time.perf_counter() - started, first["loss"], first["step"], last["loss"], last["step"],
                self.output_dir / "metrics.jsonl",
            )
        return last


def build_runner(cfg: Config) -> IterRunner:
    """Config -> task, model, processors, dataset -> the configured runner."""
    seed_everything(cfg.run.seed)
    task = registry.get("task", cfg.run.task)(cfg)
    model, processors = build_model(cfg.model)
    sources = task.build_sources()
    runner_cls = registry.get("runner", cfg.run.runner)
    return runner_cls(cfg, model, processors, task, sources)
