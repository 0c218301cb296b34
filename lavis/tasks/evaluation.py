"""Evaluation: one path for ``evaluate.py`` and for evaluation during training.

An evaluation (``evaluation.<name>`` in the config) pairs a registered evaluation task with a
dataset builder. The task turns the builder's records into :class:`EvalSample` prompts (Qwen-VL's
evaluation prompts by default), the :class:`Evaluator` generates (or, for multiple choice, scores
the options' losses) in left-padded batches, and the task turns the gathered predictions into
metrics. With ``torchrun`` the samples are split into contiguous shards, one per process, and the
results gathered so every process gets the same metrics; the main process writes
``<output_dir>/eval/<name>.json`` with the metrics and every prediction, and, for a task that gives
one (:meth:`EvalTask.submission`, e.g. VQAv2 test-dev), the evaluation server's results file
``<output_dir>/eval/<name>_submission.json``. An evaluation whose every sample was skipped has no score:
its metrics hold only ``count`` 0 and ``skipped``, and :meth:`Evaluator.evaluate` raises
:class:`EvaluationFailed` (after every evaluation ran and was written) naming it and the skip reasons.

``evaluate.py`` writes into :func:`results_dir`, which no checkpoint pruning or later training touches,
and refuses one that holds an earlier evaluation's results unless ``run.overwrite`` moves them aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lavis.common import dist
from lavis.common.config import Config, ConfigError
from lavis.common.precision import autocast
from lavis.common.registry import registry
from lavis.datasets.collate import move_to
from lavis.models.generation import left_pad, until_stop
from lavis.processors.conversation import (
    IGNORE_INDEX,
    ConversationEncoder,
    image_reference,
    pictures,
    video_reference,
)
from lavis.processors.errors import SkipSample
from lavis.processors.image import load_image
from lavis.processors.native_image import PatchImages, cat_images
from lavis.tasks.metrics import choose_option

log = logging.getLogger(__name__)

@dataclass
class EvalSample:
    """One prompt to answer: its videos and images, the text after them, and what the metric compares against.

    ``options``: continuations to rank by loss (multiple choice); empty for generation tasks.
    ``videos``: the ``<video>`` span names (a file or a directory of frames under ``image_root``, or a
    name in ``video_sources``: the record's ``videos`` mapping, ``{name: {"frames"?, "fps"?, "frames_fps"?}}``).
    """

    id: str
    images: list[str]
    text: str
    image_root: str
    reference: dict[str, Any]
    options: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    video_sources: dict[str, dict[str, Any]] = field(default_factory=dict)


class EvalTask:
    """Base of the evaluation tasks (registered under the ``eval_task`` kind, used in ``evaluation:``).

    Subclasses set ``metric_names`` and implement :meth:`samples` and :meth:`metrics`; a task
    that ranks options instead of generating also sets ``scores_options``; one that scores the records' own
    answers as training does (``heldout_loss``) sets ``scores_loss`` and implements ``prepare`` and ``score``.

    ``prompt``: the text after the image, formatted with the record's fields (e.g. ``{question}``).
    ``chat``: wrap it as a ChatML user turn (``Picture 1: <img>…</img>\\n{prompt}``, system message
    and assistant prefix) for chat models; otherwise the raw ``<img>…</img>{prompt}`` of Qwen-VL's
    own evaluation. Videos follow the pictures: ``<video>…</video>`` (chat: ``Video 1: <video>…</video>\\n``,
    as the conversation builders write them). ``max_samples``: evaluate only the first N samples (e.g. during training).
    """

    metric_names: tuple[str, ...] = ()
    scores_options = False
    scores_loss = False
    prompt_fields: tuple[str, ...] = ()

    def __init__(
        self,
        prompt: str,
        chat: bool = False,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        max_samples: int | None = None,
        min_new_tokens: int = 0,
    ) -> None:
        try:
            prompt.format(**{name: "x" for name in self.prompt_fields})
        except (KeyError, IndexError, ValueError) as err:
            fields = ", ".join("{" + f + "}" for f in self.prompt_fields) or "none"
            raise ConfigError(f"{self.registry_name}: prompt {prompt!r} cannot be formatted ({err!r}); fields: {fields}") from None
        if max_new_tokens < 1 or num_beams < 1:
            raise ConfigError(f"{self.registry_name}: max_new_tokens and num_beams must be >= 1")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ConfigError(f"{self.registry_name}: min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
        self.min_new_tokens = min_new_tokens
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"{self.registry_name}: max_samples must be >= 1 or null, got {max_samples}")
        self.prompt = prompt
        self.chat = chat
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.max_samples = max_samples

    def samples(self, records: Sequence[dict[str, Any]]) -> list[EvalSample]:
        """The prompts of this evaluation, in a fixed order."""
        raise NotImplementedError

    def prediction(self, output: str) -> str:
        """The answer in a generated text (by default the text itself, stripped)."""
        return output.strip()

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, float | int]:
        """Metrics over all results (each ``{"id", "output", "prediction", **reference}``)."""
        raise NotImplementedError

    def submission(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The records of the file an evaluation server takes for these results (questions whose
        answers are not released), written as ``<output_dir>/eval/<name>_submission.json``; None
        (the default) when the task scores the results itself."""
        return None

    @staticmethod
    def require(record: dict[str, Any], *keys: str, builder_hint: str) -> None:
        missing = [k for k in keys if k not in record]
        if missing:
            raise ConfigError(
                f"record {record.get('id')!r} has no {', '.join(missing)}: this task reads records of {builder_hint}"
            )


@dataclass
class EvalResult:
    """What one evaluation produced: its metrics, per-sample results and skipped samples by reason."""

    name: str
    task: str
    metrics: dict[str, float | int]
    results: list[dict[str, Any]]
    skipped: dict[str, int]
    seconds: float
    error: str | None = None  # why there is no score (every sample skipped)

    def to_json(self, step: int | None, model: str | None) -> dict[str, Any]:
        return {
            **({"error": self.error} if self.error else {}),
            "name": self.name,
            "task": self.task,
            "step": step,
            "model": model,
            "metrics": self.metrics,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "predictions": self.results,
        }


class EvaluationFailed(ValueError):
    """Some evaluations have no score (every sample skipped); ``results`` holds every evaluation's."""

    def __init__(self, message: str, results: dict[str, EvalResult]) -> None:
        super().__init__(message)
        self.results = results


class Evaluator:
    """Runs every evaluation of a config on a model; see the module notes."""

    def __init__(self, cfg: Config, model, processors, strategy=None) -> None:
        """``strategy``: during training, the runner's. With sharded parameters every rank must run the
        same forward calls: batches are then padded to the same count on every rank and generation
        runs in lock-step."""
        self.cfg = cfg
        self.model = model
        self.strategy = strategy
        self.lockstep = bool(strategy is not None and strategy.sharded and strategy.world_size > 1)
        self.tokenizer = processors.tokenizer
        self.image_processor = processors.image
        self.video_processor = processors.video
        # Prompts are never cut: an evaluation sample must be seen whole.
        self.encoder = ConversationEncoder(
            processors.tokenizer, model.image_tokens, cfg.model.system_message, max_len=1 << 30
        )
        self.tasks: dict[str, EvalTask] = {}
        self.samples: dict[str, list[EvalSample]] = {}
        for name, entry in cfg.evaluation.items():
            if entry.synthetic_root:  # generated on first use by the registered generator it names
                generate = registry.get("synthetic_world", entry.synthetic_world)
                with dist.local_main_first():  # once per node, not once per rank
                    generate(entry.synthetic_root)
            task = registry.get("eval_task", entry.task)(**entry.task_params)
            records = registry.get("builder", entry.builder)(**entry.builder_params).build()
            samples = task.samples(records)
            if task.max_samples is not None:
                samples = samples[: task.max_samples]
            if not samples:
                raise ConfigError(f"evaluation.{name}: the data holds no samples")
            if task.scores_loss:
                task.prepare(cfg, model, processors)
            else:
                self._check_videos(name, samples)
            self.tasks[name], self.samples[name] = task, samples
            log.info("evaluation %s (%s on %s): %d samples", name, entry.task, entry.builder, len(samples))

    def _check_videos(self, name: str, samples: list[EvalSample]) -> None:
        """Samples with videos need a model that reads them: a ConfigError naming the way out otherwise."""
        sample = next((s for s in samples if s.videos), None)
        if sample is None:
            return
        holds = f"evaluation.{name}: its records ask about videos (record {sample.id!r}: <video>{sample.videos[0]}</video>)"
        if not getattr(self.model, "native_resolution", False):
            raise ConfigError(f"{holds}, and this model's vision encoder (model.vision) takes fixed-size images: a video "
                              "needs a native-resolution model (model.vision: qwen2_vl_vit, model.image_processor: "
                              "qwen2_vl_image) with a model.video_processor (qwen2_vl_video)")
        if self.video_processor is None:
            raise ConfigError(f"{holds}, and the model has no video processor: set model.video_processor "
                              "({type: qwen2_vl_video}) or leave these records out")

    @property
    def device(self) -> torch.device:
        return self.model.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ the loop

    def evaluate(self, output_dir: str | Path | None = None, step: int | None = None, model_name: str | None = None,
                 results_dir: str | Path | None = None) -> dict[str, EvalResult]:
        """Every evaluation; writes ``<output_dir>/eval/<name>.json`` (and ``<name>_submission.json`` for
        a task that gives one), or ``<results_dir>/<name>.json`` when given, on the main process. Raises :class:`EvaluationFailed` after
        the last one when an evaluation skipped every sample (it has no score)."""
        was_training = self.model.training
        self.model.eval()
        out: dict[str, EvalResult] = {}
        if results_dir is None and output_dir is not None:
            results_dir = Path(output_dir) / "eval"
        try:
            for name in self.tasks:
                out[name] = self.evaluate_one(name)
                log.info("evaluation %s: %s (%.0f s)", name, _format_metrics(out[name].metrics), out[name].seconds)
                if results_dir is not None and dist.is_main():
                    path = Path(results_dir) / f"{name}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(out[name].to_json(step, model_name), indent=1))
                    submission = self.tasks[name].submission(out[name].results)
                    if submission is not None:
                        path = path.with_name(f"{name}_submission.json")
                        path.write_text(json.dumps(submission))
                        log.info("evaluation %s: %d answers for the evaluation server: %s", name, len(submission), path)
        finally:
            self.model.train(was_training)
        failed = [result.error for result in out.values() if result.error]
        if failed:
            raise EvaluationFailed("\n".join(failed), out)
        return out

    def evaluate_one(self, name: str) -> EvalResult:
        task, samples = self.tasks[name], self.samples[name]
        started = time.perf_counter()
        start, end = dist.shard_bounds(len(samples), dist.world_size(), dist.rank())
        results, skipped = self._run(task, samples[start:end], filler=samples[0])
        gathered = dist.all_gather_objects((results, skipped))
        results = [r for part, _ in gathered for r in part]
        skipped = sum((Counter(s) for _, s in gathered), Counter())
        error = None
        if results:
            metrics = task.metrics(results)
        else:  # no score: 0.0 over nothing would read as one
            metrics = {"count": 0}
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none"
            error = (f"evaluation {name}: every one of its {sum(skipped.values())} samples was skipped "
                     f"(by reason: {reasons}); it has no score. The log names each skipped sample")
            log.error("%s", error)
        metrics["skipped"] = sum(skipped.values())
        return EvalResult(name, task.registry_name, metrics, results, dict(skipped), time.perf_counter() - started, error)

    def _run(self, task: EvalTask, samples: list[EvalSample], filler: EvalSample) -> tuple[list[dict[str, Any]], Counter]:
        """Results of this process's samples, in sample order, and the samples skipped by reason.

        ``filler``: the sample whose batch a rank with fewer batches runs (results dropped) while
        others finish, when evaluation runs in lock-step.
        """
        if task.scores_loss:
            return self._run_loss(task, samples, filler)
        skipped: Counter = Counter()
        prepared = []
        for sample in samples:
            try:
                prepared.append((sample, *self._encode(task, sample)))
            except SkipSample as skip:
                skipped[skip.reason] += 1
                log.warning("evaluation: skipping sample %s: %s", sample.id, skip)
        outputs: dict[str, dict[str, Any]] = {}
        # Similar lengths together: less padding; results do not depend on the batch (left padding).
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][1]))
        batch_size = self.cfg.run.eval_batch_size
        batches = [[prepared[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
        padding = None
        if self.lockstep:
            most = max(dist.all_gather_objects(len(batches)))
            padding = batches[0] if batches else [(filler, *self._encode(task, filler))]
            batches += [None] * (most - len(batches))
        for batch in batches:
            with torch.no_grad(), autocast(self.device, self.cfg.run.precision), self._gathered():
                run = batch or padding
                answers = self._score_options(run) if task.scores_options else self._generate(task, run)
            for (sample, _, _), output in zip(batch or [], answers):
                prediction = output if task.scores_options else task.prediction(output)
                outputs[sample.id] = {"id": sample.id, "prompt": self.prompt_text(task, sample), "output": output,
                                      "prediction": prediction, **sample.reference}
        return [outputs[s.id] for s, _, _ in prepared], skipped

    def _run_loss(self, task: EvalTask, records: list[dict[str, Any]], filler: dict[str, Any]) -> tuple[list[dict[str, Any]], Counter]:
        """:meth:`_run` for a task that scores the records' answers (``scores_loss``): encoded and collated as in
        training, ``run.eval_batch_size`` records a batch, one forward each."""
        skipped: Counter = Counter()
        prepared = []
        for record in records:
            try:
                prepared.append((str(record["id"]), task.processor(record)))
            except SkipSample as skip:
                skipped[skip.reason] += 1
                log.warning("evaluation: skipping record %s: %s", record.get("id"), skip)
        size = self.cfg.run.eval_batch_size
        batches = [prepared[i : i + size] for i in range(0, len(prepared), size)]
        padding = None
        if self.lockstep:
            most = max(dist.all_gather_objects(len(batches)))
            padding = batches[0] if batches else [(str(filler["id"]), task.processor(filler))]
            batches += [None] * (most - len(batches))
        results = []
        for batch in batches:
            ids, samples = zip(*(batch or padding), strict=True)
            collated = move_to(task.collate(list(samples)), self.device)
            with torch.no_grad(), autocast(self.device, self.cfg.run.precision), self._gathered():
                scored = task.score(self.model, collated, list(ids))
            if batch:
                results += scored
        return results, skipped

    def _gathered(self):
        return self.strategy.evaluation(self.model) if self.strategy is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def prompt_text(task: EvalTask, sample: EvalSample) -> str:
        """The text the model is asked (a chat task's user turn, inside ChatML when encoded)."""
        if task.chat:
            videos = "".join(f"Video {n}: {video_reference(name)}\n" for n, name in enumerate(sample.videos, 1))
            return pictures(sample.images) + videos + sample.text
        return "".join(map(image_reference, sample.images)) + "".join(map(video_reference, sample.videos)) + sample.text

    def _encode(self, task: EvalTask, sample: EvalSample) -> tuple[list[int], torch.Tensor | PatchImages]:
        """The sample's prompt ids and its images (and videos) as the model takes them."""
        text = self.prompt_text(task, sample)
        root = Path(sample.image_root or "")

        def images(path: str, video: bool = False):
            if not video:
                return self.image_processor(load_image(root / path))
            source = sample.video_sources.get(path) or {}
            frames = source.get("frames")
            rates = {key: source[key] for key in ("fps", "frames_fps") if key in source}
            return self.video_processor(root / path if frames is None else [root / f for f in frames], **rates)

        if task.chat:
            messages = [{"role": "user", "content": text}]
            enc = self.encoder.encode_messages(messages, add_generation_prompt=True, images=images)
        else:
            enc = self.encoder.encode_text(text, supervised=False, images=images)
        return enc.input_ids, self.image_processor.batch(enc.processed)

    # ------------------------------------------------------------------ generation and scoring

    def _generate(self, task: EvalTask, batch: list[tuple[EvalSample, list[int], torch.Tensor]]) -> list[str]:
        """Answers as Qwen-VL's evaluation decodes them: a raw prompt ends only at ``<|endoftext|>``
        (a chat turn also at ``<|im_end|>``), after at least the task's ``min_new_tokens``, and the
        answer's text leaves special tokens out."""
        stop_ids = self.tokenizer.stop_ids if task.chat else (self.tokenizer.eod_id,)
        input_ids, attention_mask = left_pad([ids for _, ids, _ in batch], self.tokenizer.pad_id)
        tokens = self.model.generate(
            input_ids,
            attention_mask,
            cat_images([pixels for _, _, pixels in batch]),
            max_new_tokens=task.max_new_tokens,
            min_new_tokens=task.min_new_tokens,
            num_beams=task.num_beams,
            stop_ids=stop_ids,
            pad_id=self.tokenizer.pad_id,
            suppress_ids=self.tokenizer.image_span_ids,
            synced=self.lockstep,
        )
        return [self.tokenizer.decode_without_specials(until_stop(row.tolist(), stop_ids)) for row in tokens]

    def _score_options(self, batch: list[tuple[EvalSample, list[int], torch.Tensor]]) -> list[str]:
        """For each sample, the option whose tokens have the lowest mean loss after the prompt."""
        rows, labels, pixels, owners = [], [], [], []
        for k, (sample, prompt_ids, sample_pixels) in enumerate(batch):
            for option in sample.options:
                option_ids = self.encoder.encode_text(option, supervised=True).input_ids
                rows.append(prompt_ids + option_ids)
                labels.append([IGNORE_INDEX] * len(prompt_ids) + option_ids)
                pixels.append(sample_pixels)
                owners.append(k)
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=self.device)
        label_ids = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for lab in labels], device=self.device)
        attention_mask = (torch.arange(length)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        out = self.model(
            input_ids, labels=label_ids, attention_mask=attention_mask.to(self.device),
            pixel_values=cat_images(pixels).to(self.device), reduction="none",
        )
        losses, selected = out.losses, out.selected
        row_of_token = selected.nonzero()[:, 0]
        sums = torch.zeros(len(rows), device=losses.device).index_add_(0, row_of_token, losses)
        means = (sums / selected.sum(1).clamp(min=1)).tolist()
        choices, row = [], 0
        for sample, _, _ in batch:
            choices.append(choose_option(dict(zip(sample.options, means[row : row + len(sample.options)]))).strip())
            row += len(sample.options)
        return choices


def _format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def flat_metrics(results: dict[str, EvalResult], prefix: str = "eval/") -> dict[str, float | int]:
    """``{"eval/<name>/<metric>": value}`` for metrics.jsonl and wandb."""
    return {f"{prefix}{name}/{metric}": value for name, result in results.items() for metric, value in result.metrics.items()}


# --------------------------------------------------------------------------- the results table and logged samples

LOGGED_SAMPLES = 4  # predictions per evaluation that go to the experiment loggers


def table_rows(cfg: Config, results: dict[str, EvalResult], tasks: dict[str, EvalTask]) -> list[dict[str, Any]]:
    """One row per evaluation and reported metric (its task's ``metric_names`` and their ``name/part``
    breakdowns): benchmark, split, metric, value, samples, skipped (plus the evaluation and task). An
    evaluation without a score (every sample skipped) has a row per metric with value None (``n/a``)."""
    rows = []
    for name, result in results.items():
        entry = cfg.evaluation[name]
        metrics = ({m: None for m in tasks[name].metric_names} | result.metrics) if result.error else result.metrics
        for metric, value in metrics.items():
            if metric.split("/", 1)[0] in tasks[name].metric_names:
                rows.append({"benchmark": entry.benchmark or name, "split": entry.benchmark_split or "-", "metric": metric,
                             "value": value, "samples": result.metrics.get("count", 0),
                             "skipped": result.metrics.get("skipped", 0), "evaluation": name, "task": result.task})
    return rows


def logged_samples(
    results: dict[str, EvalResult], samples: dict[str, list[EvalSample]], count: int = LOGGED_SAMPLES
) -> dict[str, list[dict[str, Any]]]:
    """The first ``count`` predictions of each evaluation under :data:`lavis.tracking.tables.SAMPLE_COLUMNS`: ``reference``
    as JSON, ``image`` the path of the sample's first image (None without one)."""
    logged = {}
    for name, result in results.items():
        if not all(isinstance(sample, EvalSample) for sample in samples[name]):
            continue  # a loss over records (heldout_loss): nothing was asked or answered
        by_id = {sample.id: sample for sample in samples[name]}
        rows = []
        for entry in result.results[:count]:
            sample = by_id[entry["id"]]
            image = str(Path(sample.image_root or "") / sample.images[0]) if sample.images else None
            rows.append({"id": entry["id"], "prompt": entry["prompt"], "output": entry["output"],
                         "prediction": entry["prediction"], "reference": json.dumps(sample.reference, default=str),
                         "image": image})
        logged[name] = rows
    return logged


# --------------------------------------------------------------------------- where evaluate.py writes

RESULT_FILES = ("results.md", "*.json")  # what of an earlier evaluation a results directory may hold


def _training_run(path: Path) -> bool:
    """Whether ``path`` is a training run's output directory."""
    from lavis.common.checkpoint import CONFIG_NAME

    return (path / CONFIG_NAME).is_file() and (path / "checkpoints").is_dir()


def results_dir(cfg: Config, project: str | Path, output_dir_set: bool) -> Path:
    """Where ``evaluate.py`` writes its results (``<name>.json``, ``results.md``, ``results.json``):

    - ``<run.output_dir>/eval`` when the project or ``--options`` set ``run.output_dir``
      (``output_dir_set``) or nothing is loaded (``model.load_from`` null);
    - else, for a checkpoint of a training run, ``<run>/eval/<checkpoint>/<project>`` (e.g.
      ``outputs/sft/eval/step_00000600/demo``: in the run, outside its checkpoints, which are pruned);
    - else (an exported model, a weights file) ``<its directory>/eval/<project>``.

    A directory inside a run's checkpoint (pruned with it), a training run's own ``eval/`` (its
    evaluations during training write there), or a path through a file is a ConfigError naming it.
    """
    from lavis.models.weights import resolve_weights_path

    if output_dir_set or not cfg.model.load_from:
        out = Path(cfg.run.output_dir) / "eval"
    else:
        checkpoint = resolve_weights_path(cfg.model.load_from).parent  # model.safetensors or the sharded model/
        run = next((p for p in [checkpoint, *list(checkpoint.parents)[:2]] if _training_run(p)), None)
        if run is not None and checkpoint != run:
            out = run / "eval" / checkpoint.name / Path(project).stem
        else:
            out = checkpoint / "eval" / Path(project).stem
    for path in [out, *out.parents]:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"the results directory {out} cannot be created: {path} is a file; set run.output_dir "
                              "to a directory (results go to <run.output_dir>/eval)")
        if path.parent.name == "checkpoints" and _training_run(path.parent.parent):
            raise ConfigError(f"the results directory {out} lies inside the checkpoint {path}, which its run deletes "
                              "when it prunes old checkpoints (run.keep_last); leave run.output_dir unset (results "
                              f"then go to {path.parent.parent}/eval/{path.name}/<project>) or set it elsewhere")
    if out.name == "eval" and _training_run(out.parent):
        raise ConfigError(f"the results directory {out} is the training run's own (its evaluations during training "
                          f"write there): leave run.output_dir unset (results then go to {out}/<checkpoint>/<project>) "
                          "or set it to another directory")
    return out


def earlier_results(out: str | Path) -> str | None:
    """What of an earlier evaluation ``out`` holds (None: nothing)."""
    out = Path(out)
    found = sorted({p.name for pattern in RESULT_FILES for p in out.glob(pattern) if p.is_file()}) if out.is_dir() else []
    if not found:
        return None
    return ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
