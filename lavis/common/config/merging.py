"""Merging: YAML files, project files over their ``base:`` list, ``--options``, each component's
default YAML, and the four layers (see :mod:`lavis.common.config`) into one plain dict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lavis.common.config.checking import constructor_args, eval_task
from lavis.common.config.schema import (
    DEFAULTS_DIR,
    FREEZE_COMPONENTS,
    MODEL_COMPONENTS,
    OPTIONAL_COMPONENTS,
    SECTIONS,
    SHORTHAND_BLOCKS,
    ConfigError,
)
from lavis.common.registry import did_you_mean, registry
from lavis.common.resources import CONFIG_ROOT

log = logging.getLogger(__name__)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, as a plain (unresolved) dict."""
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
    data = load_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    layers = [load_project(path.parent / base, _seen + (path,)) for base in bases]
    return _merge(*layers, data) if layers else data


def component_defaults(kind: str, type_name: str) -> dict[str, Any]:
    """The default YAML of a registered component, or {} when it ships none."""
    path = CONFIG_ROOT / DEFAULTS_DIR[kind] / f"{type_name}.yaml"
    return load_yaml(path) if path.exists() else {}


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
    # ... and a whole block given for one replaces what earlier options set there (the later option wins):
    # model.freeze.vision=trainable model.freeze.vision='{policy: lora, r: 4}' is LoRA, not both.
    kept: list[str] = []
    for opt in options:
        key, _, value = opt.partition("=")
        if key in SHORTHAND_BLOCKS and value.lstrip().startswith("{"):
            kept = [o for o in kept if not o.partition("=")[0].startswith(key + ".")]
        kept.append(opt)
    options = kept
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
    base = _with_logger_defaults(load_yaml(CONFIG_ROOT / "default.yaml"))
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
        if _set_to_null(key, model_proj, model_opt):
            if key not in OPTIONAL_COMPONENTS:
                raise ConfigError(f"model.{key} cannot be null: a model needs one; choose one of: "
                                  f"{', '.join(registry.list(kind))} (only {', '.join(OPTIONAL_COMPONENTS)} may be null)")
            merged["model"][key] = None
            continue
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


def _set_to_null(key: str, project: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether the last layer that names ``key`` sets it to null (``--options model.video_processor=null``)."""
    layer = options if key in options else project
    return key in layer and layer[key] is None


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
    for key, kind in (("task", "eval_task"), ("builder", "builder")):
        value = options.get(key) or project.get(key)
        if not value:
            raise ConfigError(f"'{where}.{key}' is not set; choose one of: {', '.join(registry.list(kind))}")
        if kind == "eval_task":
            eval_task(value, f"{where}.task")
        else:
            registry.get(kind, value)
    task, builder = options.get("task") or project["task"], options.get("builder") or project["builder"]
    return _merge(component_defaults("builder", builder), component_defaults("eval_task", task), project, options)


def _merge_dataset(name: str, project: dict | None, options: dict | None) -> dict[str, Any]:
    project, options = project or {}, options or {}
    builder = options.get("builder") or project.get("builder")
    if not builder:
        raise ConfigError(f"'datasets.{name}.builder' is not set; choose one of: {', '.join(registry.list('builder'))}")
    registry.get("builder", builder)
    return _merge(component_defaults("builder", builder), project, options)
