"""The config's schema: the typed sections (dataclasses) that a resolved config is validated into,
the key names that belong to the framework, and :class:`ConfigError`."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from lavis.common.registry import registry

# Where each kind's default YAMLs live, under configs/.
DEFAULTS_DIR = {
    "vision_encoder": "models/vision",
    "adapter": "models/adapters",
    "llm": "models/llm",
    "processor": "processors",
    "builder": "datasets",
    "eval_task": "tasks",
    "strategy": "strategies",
    "freeze_policy": "models/freeze",
    "logger": "loggers",
}
# model.<key> -> registry kind of that component block.
MODEL_COMPONENTS = {
    "vision": "vision_encoder",
    "adapter": "adapter",
    "llm": "llm",
    "tokenizer": "processor",
    "image_processor": "processor",
    "video_processor": "processor",
}
# Model components a config may set to null (``model.video_processor: null``: a model that takes no video).
OPTIONAL_COMPONENTS = ("video_processor",)
# Constructor arguments the framework supplies itself (never user keys).
CONTEXT_ARGS = {"adapter": ("vision_width", "llm_hidden_size")}
# Keys of a dataset entry that belong to the framework, not to the builder.
DATASET_KEYS = ("builder", "ratio", "synthetic_root", "synthetic_world")
# Keys of an evaluation entry that belong to the framework, not to its task or builder.
EVAL_KEYS = ("task", "builder", "synthetic_root", "synthetic_world", "benchmark", "benchmark_split")
SECTIONS = ("model", "datasets", "evaluation", "run")
# Which tokens of a conversation are supervised (``run.label_policy``; applied by
# lavis.processors.conversation.ConversationEncoder).
LabelPolicy = Literal["assistant", "qwen_vl_finetune"]
LABEL_POLICIES: tuple[str, ...] = typing.get_args(LabelPolicy)
# Component blocks that may be given by their type's name alone (``run.strategy: fsdp``).
FREEZE_COMPONENTS = ("vision", "adapter", "llm")
SHORTHAND_BLOCKS = ("run.strategy", *(f"model.freeze.{name}" for name in FREEZE_COMPONENTS))


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what would be valid."""


# --------------------------------------------------------------------------- typed sections


@dataclass
class ComponentConfig:
    """A registered component: its registry ``type`` and its constructor arguments."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FreezeConfig:
    """Per-component training policy: a registered ``freeze_policy`` block each."""

    vision: ComponentConfig
    adapter: ComponentConfig
    llm: ComponentConfig


@dataclass
class ModelConfig:
    """The composite VLM and the processors that prepare its inputs."""

    arch: str
    vision: ComponentConfig
    adapter: ComponentConfig
    llm: ComponentConfig
    tokenizer: ComponentConfig
    image_processor: ComponentConfig
    video_processor: ComponentConfig | None  # null: the model takes no video
    freeze: FreezeConfig
    system_message: str
    load_from: str | None
    # evaluate.py: keys of this section (e.g. vision.image_size) that deliberately differ from the trained
    # run's config.yaml; the model is otherwise the run's (lavis/models/loading.py). Not used in training.
    override: list[str] = field(default_factory=list)


@dataclass
class DatasetConfig:
    """One training dataset: its builder, its mixture ratio and the builder's arguments."""

    builder: str
    ratio: float = 1.0
    synthetic_root: str | None = None  # generate the embedded synthetic world here first, if missing
    synthetic_world: str = "shapes"  # which one: a registered synthetic_world generator (shapes | small_objects | videos)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """One evaluation: a registered evaluation task over a builder's records (``evaluation.<name>``)."""

    task: str
    builder: str
    synthetic_root: str | None = None  # as DatasetConfig's
    synthetic_world: str = "shapes"  # as DatasetConfig's
    benchmark: str | None = None  # its name in the results table (default: the evaluation's name)
    benchmark_split: str | None = None  # its split in the results table (e.g. testA, val)
    task_params: dict[str, Any] = field(default_factory=dict)
    builder_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbConfig:
    """Weights & Biases logging (``run.wandb``, logger ``wandb``); off while ``project`` is null."""

    project: str | None
    entity: str | None
    name: str | None
    tags: list[str]

    @property
    def enabled(self) -> bool:
        return self.project is not None


@dataclass
class TensorBoardConfig:
    """TensorBoard logging (``run.tensorboard``, logger ``tensorboard``); off while ``log_dir`` is null.
    A relative ``log_dir`` lies under ``run.output_dir``."""

    log_dir: str | None

    @property
    def enabled(self) -> bool:
        return self.log_dir is not None


@dataclass
class LrScaleConfig:
    """Learning-rate multipliers per component."""

    vision: float
    adapter: float
    llm: float


ReferenceSource = Literal["frozen_copy", "adapters_off", "precomputed"]


@dataclass
class DPOConfig:
    """The preference loss of ``run.task: dpo`` (``run.dpo``; see :mod:`lavis.tasks.dpo`)."""

    beta: float = 0.1  # the KL weight: the implicit reward is beta x the log-ratio to the reference
    label_smoothing: float = 0.0  # cDPO: the share of pairs assumed mislabelled, in [0, 0.5)
    sft_weight: float = 0.0  # RPO / MPO: weight of the chosen answer's mean token NLL, added per pair
    reference: ReferenceSource = "frozen_copy"  # where the reference log-probabilities come from
    precompute_ref: bool = False  # compute them once before the first step (cached in output_dir)
    reference_file: str | None = None  # precompute_ref's cache shared by runs (null: <output_dir>/reference_logps.json)


@dataclass
class RunConfig:
    """The training run: task, runner, optimisation, data loading, checkpoints and logs."""

    task: str
    runner: str
    strategy: ComponentConfig
    dist_timeout_s: float
    world_size_hint: int | None
    precision: Literal["fp32", "bf16", "fp16"]
    device: str
    seed: int
    max_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    lr_scheduler: str
    warmup_steps: int
    weight_decay: float
    betas: list[float]
    eps: float
    clip_grad: float | None
    max_len: int
    label_policy: LabelPolicy
    pack: bool
    lr_scale: LrScaleConfig
    layer_decay: float | None
    save_weights: Literal["trainable", "full"]
    num_workers: int
    max_skip_ratio: float
    log_every: int
    save_every: int
    keep_last: int
    output_dir: str
    resume: str | None
    overwrite: bool
    eval_every: int | None
    eval_batch_size: int
    best_metric: str | None
    best_mode: Literal["max", "min"]
    wandb: WandbConfig
    tensorboard: TensorBoardConfig
    # Micro-batches by budget (per rank; lavis.datasets.stream.StreamConfig): text tokens (padded: rows x the
    # longest sample; packed: rows of max_len) and vision patches (native images' patches, fixed-size images 1
    # each); null and null: batch_size samples (rows) per micro-batch.
    batch_tokens: int | None = None
    batch_patches: int | None = None
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass
class Config:
    """The whole resolved config; ``raw`` is the plain dict written to ``config.yaml``."""

    model: ModelConfig
    datasets: dict[str, DatasetConfig]
    evaluation: dict[str, EvalConfig]
    run: RunConfig
    raw: dict[str, Any]

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.raw))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())

    def check_local_paths(self) -> None:
        """Fail, naming every key, when a configured local file or directory is missing: model weights,
        tokenizer, annotation files, image roots (a dataset generated from ``synthetic_root`` excepted)
        and an evaluation task's files (its keys ending in ``_path``).
        Run before anything is built, so that a placeholder path fails in a second, not after loading
        a 7B model. Then :meth:`check_output_dir`."""
        found = [(f"model.{name}.{key}", value) for name in ("vision", "llm", "tokenizer")
                 for key, value in getattr(self.model, name).params.items() if key in ("pretrained", "path")]
        entries = [(f"datasets.{n}", d.builder, d.params, d.synthetic_root) for n, d in self.datasets.items()]
        entries += [(f"evaluation.{n}", e.builder, e.builder_params, e.synthetic_root) for n, e in self.evaluation.items()]
        found += [(f"evaluation.{n}.{key}", value) for n, e in self.evaluation.items()
                  for key, value in e.task_params.items() if key.endswith("_path")]
        published = {}
        for where, builder, params, synthetic in entries:
            if synthetic is None:
                keys = [f"{where}.{key}" for key in params if key.endswith("_path") or key == "image_root"]
                found += [(key, params[key.rsplit(".", 1)[1]]) for key in keys]
                released_at = getattr(registry.get("builder", builder), "released_at", "")
                published.update({key: f" (released at {released_at})" for key in keys if released_at})
        missing = [f"  {key}: {path}{published.get(key, '')}" for key, value in found for path in _as_list(value)
                   if path and not Path(path).exists()]
        if missing:
            llm = self.model.llm.params.get("pretrained")
            hint = ("\n(a Qwen-VL release becomes model.llm.pretrained's directory with: python -m lavis.convert "
                    "from-qwen-vl SRC OUT)") if llm and not Path(llm).exists() else ""
            raise FileNotFoundError("local files not found (point these keys at your copies with --options key=path):\n"
                                    + "\n".join(missing) + hint)
        self.check_output_dir()

    def check_output_dir(self) -> None:
        """Fail, naming ``run.output_dir``, when the run could not write there: a file, or a directory (or
        the nearest existing parent of one to create) that cannot be written. Nothing is created."""
        import tempfile

        out = Path(self.run.output_dir)
        way_out = "point run.output_dir at a directory this user can write (--options run.output_dir=PATH)"
        if out.exists() and not out.is_dir():
            raise ConfigError(f"run.output_dir {out} is a file, not a directory: {way_out}")
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"run.output_dir {out} cannot be created: {existing} is a file, not a directory: {way_out}")
        try:
            with tempfile.TemporaryFile(dir=existing):  # a real write: permissions, read-only file systems, ACLs
                pass
        except OSError as err:
            what = "is not writable" if existing == out else f"cannot be created: {existing} is not writable"
            raise ConfigError(f"run.output_dir {out} {what} ({err.strerror or err}): {way_out}") from None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
