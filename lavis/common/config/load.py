"""load_config: a project YAML and its ``--options`` through the layers into a validated config."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lavis.common.config.merging import load_project, merge_layers, parse_options
from lavis.common.config.schema import Config, ConfigError
from lavis.common.config.validation import build_config


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> Config:
    """Load a project YAML with ``--options`` overrides into a validated :class:`Config`."""
    merged = merge_layers(load_project(cfg_path), parse_options(options))
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except Exception as err:  # a bad ${...} interpolation
        raise ConfigError(f"cannot resolve {cfg_path}: {err}") from None
    return build_config(resolved)
