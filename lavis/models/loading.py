"""The model of a trained run, built from the run's own ``config.yaml``: one path for
:func:`lavis.load_model` and ``evaluate.py``.

A trained model is defined by the config it was trained with, not by the config that asks for it: an
evaluation project's ``model`` section only says which weights to read (``model.load_from``). A key
that the evaluation sets itself (in its project files or ``--options``) and that contradicts the run's
is an error naming both values, unless ``model.override`` lists it (a deliberate change, e.g. another
image size). Keys that an evaluation project merely inherits from the shipped presets and defaults
(files under ``configs/``) are the run's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from lavis.common.checkpoint import META_NAME, read_meta
from lavis.common.config import (
    Config,
    ConfigError,
    build_config,
    load_config,
    load_yaml,
    parse_options,
)
from lavis.common.resources import CONFIG_ROOT
from lavis.models import Processors, build_model
from lavis.models.vlm import VisionLanguageModel
from lavis.models.weights import config_of, load_trained, resolve_weights_path

log = logging.getLogger(__name__)

# model keys that say which weights to read, or how to read them, or how the model trains (the
# freeze policies: a LoRA model evaluates as its merged weights do): never part of the comparison.
NOT_COMPARED = ("load_from", "override", "freeze")
OPTIONS = "--options"


def trained_config(path: str | Path) -> tuple[Path, Path | None]:
    """The weights of ``path`` (a run's output_dir, a checkpoint directory or a weights file) and the
    ``config.yaml`` they were trained with (None when neither the checkpoint nor a run holds one)."""
    weights = resolve_weights_path(str(path))
    return weights, config_of(weights)


def model_config(config: Path) -> Config:
    """A model's ``config.yaml``. One in a directory whose ``meta.json`` names a ``weights_file`` (a
    converted release) names its files through the keys of the meta's ``located_keys``
    (``model.llm.pretrained`` when it has none: from-qwen-vl's output), set here to that directory as
    it lies now (a moved directory still loads)."""
    config = Path(config)
    meta = read_meta(config.parent) if (config.parent / META_NAME).is_file() else {}
    if not meta.get("weights_file"):
        return load_config(config)
    here = config.parent.absolute()
    return load_config(config, [f"{key}={here}" for key in meta.get("located_keys", ["model.llm.pretrained"])])


def build_trained(model_cfg, weights: str | Path) -> tuple[VisionLanguageModel, Processors]:
    """Build ``model_cfg`` (its ``load_from`` ignored) and load the trained weights of ``weights``
    (following a trainable-only checkpoint's chain, see :func:`lavis.models.weights_chain`)."""
    model, processors = build_model(dataclasses.replace(model_cfg, load_from=None))
    load_trained(model, str(weights))
    return model, processors


# --------------------------------------------------------------------------- which keys a user set


def _leaves(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def explicit_keys(cfg_path: str | Path, options: list[str] | None = None) -> dict[str, str]:
    """The dotted keys (``model.llm.config.rope_theta``, ``run.output_dir``) that a project sets itself
    -> where (the file, or ``--options``): keys of its files and their ``base:`` files, except the
    shipped defaults and presets under ``configs/``, and of ``--options``."""
    found: dict[str, str] = {}

    def walk(path: Path, seen: tuple[Path, ...]) -> None:
        path = path.resolve()
        if path in seen:
            return  # load_project reports the loop
        data = load_yaml(path)
        bases = data.pop("base", None) or []
        for base in [bases] if isinstance(bases, str) else bases:
            walk(path.parent / base, seen + (path,))
        if not path.is_relative_to(CONFIG_ROOT):
            found.update(dict.fromkeys(_leaves(data, ""), str(path)))

    walk(Path(cfg_path), ())
    found.update(dict.fromkeys(_leaves(parse_options(options), ""), OPTIONS))
    return found


# --------------------------------------------------------------------------- the evaluated model


_MISSING = object()


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _show(value: Any) -> str:
    return "<not set>" if value is _MISSING else repr(value)


def _overridden(key: str, override: list[str]) -> bool:
    return any(key == o or key.startswith(o + ".") for o in override)


def evaluation_config(cfg: Config, explicit: dict[str, str]) -> tuple[Config, Path | None]:
    """``cfg`` with the model of ``cfg.model.load_from`` as it was trained: the ``model`` section of the
    run's ``config.yaml``, with the keys of ``model.override`` taken from ``cfg``. A key of ``model``
    that ``explicit`` names (see :func:`explicit_keys`), not overridden, whose value differs from the
    run's is a ConfigError naming both values. Returns the config and the ``config.yaml`` read (None:
    the weights have none, and ``cfg``'s model section is used, with a warning)."""
    if not cfg.model.load_from:
        return cfg, None
    try:
        weights, config = trained_config(cfg.model.load_from)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.load_from: {err}") from None
    override = [key.removeprefix("model.") for key in cfg.model.override]
    ours = cfg.raw["model"]
    for key in override:
        if _get(ours, key) is _MISSING:
            raise ConfigError(f"model.override: '{key}' is not a key of the model section (e.g. vision.image_size)")
    if config is None:
        log.warning("model.load_from %s: no config.yaml in the checkpoint or its run; the model is built from "
                    "this config's model section", weights)
        return cfg, None
    trained = model_config(config).raw["model"]
    contradictions = []
    for dotted, where in explicit.items():
        section, _, key = dotted.partition(".")
        if section != "model" or key.split(".", 1)[0] in NOT_COMPARED or _overridden(key, override):
            continue
        value, theirs = _get(ours, key), _get(trained, key)
        if value != theirs:
            contradictions.append(f"  model.{key}: {_show(value)} here ({where}), {_show(theirs)} in {config}")
    if contradictions:
        raise ConfigError(
            f"the model of {cfg.model.load_from} is defined by {config}, and this evaluation contradicts it:\n"
            + "\n".join(contradictions)
            + "\nDrop these keys to evaluate the model as trained, or list them under model.override to evaluate it "
            f"changed on purpose (e.g. --options 'model.override=[{contradictions[0].split(':')[0].strip().removeprefix('model.')}]')"
        )
    model = copy.deepcopy(trained)
    for key in override:
        _set(model, key, copy.deepcopy(_get(ours, key)))
    model["load_from"], model["override"] = cfg.model.load_from, list(cfg.model.override)
    inherited = sorted(k for k, v in _leaves({k: v for k, v in ours.items() if k not in NOT_COMPARED}, "").items()
                       if _get(model, k) != v)
    log.info("model: built from %s%s%s", config,
             f", with model.override {', '.join(override)}" if override else "",
             f"; this config's inherited values of {', '.join(inherited)} are not used" if inherited else "")
    raw = {**cfg.raw, "model": model}
    return dataclasses.replace(cfg, model=build_config(raw).model, raw=raw), config


# --------------------------------------------------------------------------- inference


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None) -> tuple[VisionLanguageModel, Processors]:
    """A trained model and its processors, ready for ``generate`` and ``chat``.

    ``path``: a run's ``output_dir`` (its newest checkpoint), a checkpoint directory (e.g.
    ``<output_dir>/checkpoints/best``), its ``model.safetensors``, or from-qwen-vl's output. The model is built from the
    run's ``config.yaml``; weights saved trainable-only are completed from the run's own
    ``model.load_from`` chain. ``device``: ``auto`` = CUDA when available. ``dtype``: cast the
    weights (e.g. ``torch.bfloat16``); default keeps fp32.
    """
    weights, config = trained_config(path)
    if config is None:
        raise FileNotFoundError(f"{path}: no config.yaml in the checkpoint or its run (expected <output_dir>/config.yaml)")
    cfg = model_config(config)
    model, processors = build_trained(cfg.model, weights)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device=device, dtype=dtype).eval()
    model.attach_processors(processors, cfg.model.system_message)
    return model, processors
