"""Config: project YAML over component defaults, then ``--options``; validated into typed objects.

Layers, lowest first:
  1. ``configs/default.yaml``: run and model defaults, with each registered logger's block
     (``run.wandb``, ``run.tensorboard``) from ``configs/loggers/<name>.yaml``;
  2. each component's default YAML, chosen by its ``type`` (``configs/models/adapters/mlp.yaml``, ...);
  3. the project YAML, over the files its ``base:`` list names;
  4. ``--options key=value`` (dotted keys; values typed as YAML: ``16``, ``2e-5``, ``[0.9,0.98]``).

Component blocks (``model.vision``, ``model.adapter``, ``model.llm``, ``model.tokenizer``,
``model.image_processor``, ``run.strategy``, each dataset, each evaluation's task and builder) are
checked against the
registered class's constructor:
its argument names are the valid keys and its type hints the valid types. Fixed sections are
checked against the dataclasses below. Unknown keys fail with a "did you mean".
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from lavis.common.registry import did_you_mean, registry
from lavis.common.resources import CONFIG_ROOT
from lavis.processors.conversation import LabelPolicy

log = logging.getLogger(__name__)


# Where each kind's default YAMLs live, under configs/.
DEFAULTS_DIR = {
    "vision_encoder": "models/vision",
    "adapter": "models/adapters",
    "llm": "models/llm",
    "processor": "processors",
    "builder": "datasets",
    "task": "tasks",
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
}
# Constructor arguments the framework supplies itself (never user keys).
CONTEXT_ARGS = {"adapter": ("vision_width", "llm_hidden_size")}
# Keys of a dataset entry that belong to the framework, not to the builder.
DATASET_KEYS = ("builder", "ratio", "synthetic_root")
# Keys of an evaluation entry that belong to the framework, not to its task or builder.
EVAL_KEYS = ("task", "builder", "synthetic_root", "benchmark", "benchmark_split")
SECTIONS = ("model", "datasets", "evaluation", "run")
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
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """One evaluation: a registered evaluation task over a builder's records (``evaluation.<name>``)."""

    task: str
    builder: str
    synthetic_root: str | None = None
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


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked (and int->float widened) against the annotation ``tp``."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, args))}{did_you_mean(value, args)}"
            )
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return to_dataclass(tp, value, where)
    return value


def _check_keys(keys, valid, where: str) -> None:
    for key in keys:
        if key not in valid:
            raise ConfigError(
                f"unknown key '{where}.{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(sorted(valid)) or 'none'}"
            )


def to_dataclass(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, failing on unknown, missing or mistyped keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(data, fields, where)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = check_type(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key '{where}.{name}'")
    return cls(**values)


def constructor_args(cls, kind: str) -> dict[str, inspect.Parameter]:
    """The user-settable constructor arguments of a registered class (context args excluded)."""
    target = cls.__init__ if inspect.isclass(cls) else cls
    params = inspect.signature(target).parameters
    skip = {"self", *CONTEXT_ARGS.get(kind, ())}
    return {
        name: p
        for name, p in params.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_params(cls, kind: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a component block's keys and types against ``cls``'s constructor."""
    accepted = constructor_args(cls, kind)
    _check_keys(params, accepted, where)
    target = cls.__init__ if inspect.isclass(cls) else cls
    hints = typing.get_type_hints(target)
    checked = {}
    for name, p in accepted.items():
        if name in params:
            checked[name] = check_type(params[name], hints.get(name, Any), f"{where}.{name}")
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"missing key '{where}.{name}' (required by {kind} '{cls.registry_name}')")
    return checked


# --------------------------------------------------------------------------- loading and merging


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as err:  # YAML syntax errors carry the line
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return OmegaConf.to_container(loaded, resolve=False)


def load_project(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A project YAML merged over the files its ``base:`` list names (paths relative to it)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' includes itself: {' -> '.join(map(str, _seen + (path,)))}")
    data = _load_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    layers = [load_project(path.parent / base, _seen + (path,)) for base in bases]
    return _merge(*layers, data) if layers else data


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def component_defaults(kind: str, type_name: str) -> dict[str, Any]:
    """The default YAML of a registered component, or {} when it ships none."""
    path = CONFIG_ROOT / DEFAULTS_DIR[kind] / f"{type_name}.yaml"
    return _load_yaml(path) if path.exists() else {}


def parse_options(options: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict with YAML-typed values."""
    if not options:
        return {}
    for opt in options:
        if "=" not in opt:
            raise ConfigError(f"--options expects key=value, got '{opt}'")
    # The short form of a component block names its type, so that its keys can follow in any order:
    # run.strategy=fsdp run.strategy.reshard_after_forward=false
    options = [
        f"{key}.type={value}" if key in SHORTHAND_BLOCKS and not value.lstrip().startswith("{") else opt
        for opt in options
        for key, _, value in [opt.partition("=")]
    ]
    try:
        parsed = OmegaConf.from_dotlist(list(options))
    except Exception as err:  # a value that is not valid YAML, e.g. an unquoted {...}
        raise ConfigError(f"--options: cannot parse {' '.join(options)!r}: {err}; quote such values: key='{{a}} b'") from None
    return OmegaConf.to_container(parsed, resolve=False)


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(x) for x in layers]), resolve=False)


def _merge_component(
    kind: str, where: str, base: dict | None, project: dict | None, options: dict | None
) -> dict[str, Any]:
    """Default YAML of the chosen type, then the project's block, then the overrides.

    When ``--options`` changes a component's ``type``, the project's keys that the new type does
    not accept are dropped with a warning (they configured the component being replaced).
    """
    base, project, options = base or {}, project or {}, options or {}
    type_name = options.get("type") or project.get("type") or base.get("type")
    if not type_name:
        raise ConfigError(f"'{where}.type' is not set; choose one of: {', '.join(registry.list(kind))}")
    cls = registry.get(kind, type_name)
    if project.get("type") not in (None, type_name):
        accepted = constructor_args(cls, kind)
        dropped = [k for k in project if k != "type" and k not in accepted]
        if dropped:
            log.warning(
                "%s: type changed from '%s' to '%s' by --options; dropped keys that '%s' does not accept: %s",
                where, project["type"], type_name, type_name, ", ".join(dropped),
            )
        project = {k: v for k, v in project.items() if k not in dropped}
    if base.get("type") not in (None, type_name):
        base = {}
    return _merge(component_defaults(kind, type_name), base, project, options, {"type": type_name})


def merge_layers(project: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Merge the four layers into one plain (unresolved) dict."""
    base = _with_logger_defaults(_load_yaml(CONFIG_ROOT / "default.yaml"))
    for name, section in (("project", project), ("options", options)):
        for key in section:
            if key not in SECTIONS:
                raise ConfigError(
                    f"unknown top-level key '{key}' in {name}{did_you_mean(key, SECTIONS)}; "
                    f"valid keys: {', '.join(SECTIONS)}"
                )
    base, project, options = (_with_component_blocks(x) for x in (base, project, options))
    merged = _merge(base, project, options)
    run_base, run_proj, run_opt = ((x.get("run") or {}).get("strategy") for x in (base, project, options))
    merged["run"]["strategy"] = _merge_component("strategy", "run.strategy", run_base, run_proj, run_opt)
    model_base, model_proj, model_opt = (x.get("model") or {} for x in (base, project, options))
    for key, kind in MODEL_COMPONENTS.items():
        merged["model"][key] = _merge_component(
            kind, f"model.{key}", model_base.get(key), model_proj.get(key), model_opt.get(key)
        )
    freeze_base, freeze_proj, freeze_opt = (x.get("freeze") or {} for x in (model_base, model_proj, model_opt))
    for key in FREEZE_COMPONENTS:
        merged["model"]["freeze"][key] = _merge_component(
            "freeze_policy", f"model.freeze.{key}", freeze_base.get(key), freeze_proj.get(key), freeze_opt.get(key)
        )
    data_proj, data_opt = project.get("datasets") or {}, options.get("datasets") or {}
    merged["datasets"] = {
        name: _merge_dataset(name, data_proj.get(name), data_opt.get(name)) for name in _entries(data_proj, data_opt)
    }
    eval_proj, eval_opt = project.get("evaluation") or {}, options.get("evaluation") or {}
    merged["evaluation"] = {
        name: _merge_evaluation(name, eval_proj.get(name), eval_opt.get(name)) for name in _entries(eval_proj, eval_opt)
    }
    return merged


def _with_logger_defaults(base: dict[str, Any]) -> dict[str, Any]:
    """``run.<name>`` of every registered logger, from its default YAML (``configs/loggers/<name>.yaml``)."""
    run = base["run"]
    for name in registry.list("logger"):
        run[name] = _merge(component_defaults("logger", name), run.get(name) or {})
    return base


def _with_component_blocks(layer: dict[str, Any]) -> dict[str, Any]:
    """``run.strategy`` and ``model.freeze.<component>`` as component blocks: ``run.strategy: fsdp`` is
    short for ``{type: fsdp}``, ``model.freeze.llm: lora`` for ``{type: lora}``; a freeze block may
    name its type ``policy``."""
    run, model = layer.get("run"), layer.get("model")
    if isinstance(run, dict) and isinstance(run.get("strategy"), str):
        layer = {**layer, "run": {**run, "strategy": {"type": run["strategy"]}}}
    if isinstance(model, dict) and isinstance(model.get("freeze"), dict):
        freeze = {key: _freeze_block(value) if key in FREEZE_COMPONENTS else value for key, value in model["freeze"].items()}
        layer = {**layer, "model": {**model, "freeze": freeze}}
    return layer


def _freeze_block(value: Any) -> Any:
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, dict) and "policy" in value:
        if "type" in value and value["type"] != value["policy"]:
            raise ConfigError(f"model.freeze: a block names both policy '{value['policy']}' and type '{value['type']}'")
        return {"type": value["policy"], **{k: v for k, v in value.items() if k != "policy"}}
    return value


def _entries(project: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """The names of a section's entries; one set to null (``--options evaluation.vqav2_val=null``, or
    in a project over its base) is dropped, e.g. to run part of a suite."""
    return [name for name in {**project, **options} if (options if name in options else project)[name] is not None]


def _merge_evaluation(name: str, project: dict | None, options: dict | None) -> dict[str, Any]:
    """The builder's default YAML, then the task's, then the project's entry, then the overrides."""
    project, options = project or {}, options or {}
    where = f"evaluation.{name}"
    for key, kind in (("task", "task"), ("builder", "builder")):
        value = options.get(key) or project.get(key)
        if not value:
            raise ConfigError(f"'{where}.{key}' is not set; choose one of: {', '.join(_eval_names(kind))}")
        registry.get(kind, value)
    task, builder = options.get("task") or project["task"], options.get("builder") or project["builder"]
    return _merge(component_defaults("builder", builder), component_defaults("task", task), project, options)


def _eval_names(kind: str) -> list[str]:
    names = registry.list(kind)
    return [n for n in names if getattr(registry.get(kind, n), "is_evaluation", False)] if kind == "task" else names


def _merge_dataset(name: str, project: dict | None, options: dict | None) -> dict[str, Any]:
    project, options = project or {}, options or {}
    builder = options.get("builder") or project.get("builder")
    if not builder:
        raise ConfigError(f"'datasets.{name}.builder' is not set; choose one of: {', '.join(registry.list('builder'))}")
    registry.get("builder", builder)
    return _merge(component_defaults("builder", builder), project, options)


# --------------------------------------------------------------------------- typed config


def _component(kind: str, block: dict[str, Any], where: str) -> ComponentConfig:
    block = dict(block)
    type_name = block.pop("type")
    cls = registry.get(kind, type_name)
    return ComponentConfig(type=type_name, params=check_params(cls, kind, block, where))


def build_config(resolved: dict[str, Any]) -> Config:
    """Validate a merged, interpolation-resolved dict into a typed :class:`Config`."""
    model = dict(resolved["model"])
    components = {key: _component(kind, model.pop(key), f"model.{key}") for key, kind in MODEL_COMPONENTS.items()}
    freeze = dict(model.pop("freeze"))
    _check_keys(freeze, FREEZE_COMPONENTS, "model.freeze")
    policies = {key: vars(_component("freeze_policy", freeze[key], f"model.freeze.{key}")) for key in FREEZE_COMPONENTS}
    model_cfg = to_dataclass(ModelConfig, {**model, **{k: vars(c) for k, c in components.items()}, "freeze": policies}, "model")
    datasets = {}
    for name, entry in (resolved.get("datasets") or {}).items():
        entry = dict(entry)
        where = f"datasets.{name}"
        builder = registry.get("builder", entry.get("builder"))
        _check_keys(entry, [*constructor_args(builder, "builder"), *DATASET_KEYS], where)
        common = to_dataclass(DatasetConfig, {k: entry.pop(k) for k in DATASET_KEYS if k in entry}, where)
        common.params = check_params(registry.get("builder", common.builder), "builder", entry, where)
        if common.ratio <= 0:
            raise ConfigError(f"{where}.ratio must be positive, got {common.ratio}")
        datasets[name] = common
    evaluation = {name: _evaluation(name, entry) for name, entry in (resolved.get("evaluation") or {}).items()}
    run_block = dict(resolved["run"])
    strategy = _component("strategy", run_block.pop("strategy"), "run.strategy")
    run = to_dataclass(RunConfig, {**run_block, "strategy": vars(strategy)}, "run")
    if getattr(registry.get("task", run.task), "is_evaluation", False):
        raise ConfigError(
            f"run.task: '{run.task}' is an evaluation task; name it under 'evaluation:' (training tasks: "
            f"{', '.join(n for n in registry.list('task') if n not in _eval_names('task'))})"
        )
    registry.get("runner", run.runner)
    registry.get("lr_scheduler", run.lr_scheduler)
    registry.get("model", model_cfg.arch)
    for key in ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "save_every", "keep_last", "eval_batch_size"):
        if getattr(run, key) < 1:
            raise ConfigError(f"run.{key} must be >= 1, got {getattr(run, key)}")
    if run.dist_timeout_s <= 0:
        raise ConfigError(f"run.dist_timeout_s must be > 0, got {run.dist_timeout_s}")
    if run.world_size_hint is not None and run.world_size_hint < 1:
        raise ConfigError(f"run.world_size_hint must be >= 1 or null, got {run.world_size_hint}")
    _check_schedule(run)
    _check_eval_schedule(run, evaluation)
    _check_freeze_strategy(model_cfg.freeze, run.strategy)
    return Config(model=model_cfg, datasets=datasets, evaluation=evaluation, run=run, raw=resolved)


def _evaluation(name: str, entry: dict[str, Any]) -> EvalConfig:
    """Split an evaluation entry into its task's and its builder's arguments, checking both."""
    where = f"evaluation.{name}"
    entry = dict(entry)
    task_cls, builder_cls = registry.get("task", entry.get("task")), registry.get("builder", entry.get("builder"))
    if not getattr(task_cls, "is_evaluation", False):
        raise ConfigError(f"{where}.task: '{entry['task']}' is a training task; evaluation tasks: {', '.join(_eval_names('task'))}")
    task_args, builder_args = constructor_args(task_cls, "task"), constructor_args(builder_cls, "builder")
    clash = sorted(set(task_args) & set(builder_args))
    if clash:  # a registration problem, not a user's: the flat entry would be ambiguous
        raise ConfigError(f"{where}: task '{entry['task']}' and builder '{entry['builder']}' both take {clash}")
    _check_keys(entry, [*task_args, *builder_args, *EVAL_KEYS], where)
    common = to_dataclass(EvalConfig, {k: entry.pop(k) for k in EVAL_KEYS if k in entry}, where)
    common.task_params = check_params(task_cls, "task", {k: v for k, v in entry.items() if k in task_args}, where)
    common.builder_params = check_params(builder_cls, "builder", {k: v for k, v in entry.items() if k in builder_args}, where)
    return common


def _check_schedule(run: RunConfig) -> None:
    """Settings that contradict each other are errors naming both keys (an ablation that changes one
    of them would otherwise train on a schedule nobody asked for)."""
    if run.lr <= 0:
        raise ConfigError(f"run.lr must be > 0, got {run.lr}")
    if run.min_lr > run.lr:
        raise ConfigError(
            f"run.min_lr ({run.min_lr:g}) is above run.lr ({run.lr:g}): the schedule would climb to min_lr "
            f"after the warm-up; set run.min_lr to at most run.lr (e.g. run.min_lr={run.lr / 10:g})"
        )
    if run.warmup_steps >= run.max_steps:
        raise ConfigError(
            f"run.warmup_steps ({run.warmup_steps}) is not below run.max_steps ({run.max_steps}): the run would end "
            "before the learning rate reaches run.lr; lower run.warmup_steps"
        )


def _check_freeze_strategy(freeze: FreezeConfig, strategy: ComponentConfig) -> None:
    quantized = [name for name, block in vars(freeze).items() if block.type == "qlora"]
    if quantized and strategy.type == "fsdp":
        raise ConfigError(
            f"model.freeze.{quantized[0]}: qlora's 4-bit weights are not sharded by run.strategy=fsdp here; "
            "use run.strategy=ddp (each GPU holds the 4-bit model) or policy lora"
        )


def _check_eval_schedule(run: RunConfig, evaluation: dict[str, EvalConfig]) -> None:
    if run.eval_every is not None and run.eval_every < 1:
        raise ConfigError(f"run.eval_every must be >= 1 or null, got {run.eval_every}")
    if run.eval_every and not evaluation:
        raise ConfigError("run.eval_every is set but no evaluation is configured: add entries under 'evaluation:'")
    if run.best_metric is None:
        return
    name, _, metric = run.best_metric.partition("/")
    if name not in evaluation:
        raise ConfigError(
            f"run.best_metric '{run.best_metric}': no evaluation named '{name}'{did_you_mean(name, evaluation)}; "
            f"write it as <evaluation name>/<metric>, evaluations: {', '.join(evaluation) or 'none'}"
        )
    metrics = registry.get("task", evaluation[name].task).metric_names
    if metric not in metrics:
        raise ConfigError(
            f"run.best_metric '{run.best_metric}': task '{evaluation[name].task}' reports no metric '{metric}'"
            f"{did_you_mean(metric, metrics)}; its metrics: {', '.join(metrics)}"
        )
    if not run.eval_every:
        raise ConfigError("run.best_metric needs run.eval_every: the best checkpoint is chosen at evaluations during training")


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> Config:
    """Load a project YAML with ``--options`` overrides into a validated :class:`Config`."""
    merged = merge_layers(load_project(cfg_path), parse_options(options))
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except Exception as err:  # a bad ${...} interpolation
        raise ConfigError(f"cannot resolve {cfg_path}: {err}") from None
    return build_config(resolved)
