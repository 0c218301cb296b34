"""A trained model's weights on disk: which file a path means, which config.yaml they were trained
with, the chain of earlier stages a trainable-only checkpoint needs, and loading them into a built model."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from lavis.common.checkpoint import (
    CONFIG_NAME,
    META_NAME,
    SHARDED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    is_sharded,
    list_checkpoints,
    load_weights_file,
    read_meta,
    weights_path,
)
from lavis.models.freeze import lora_scales
from lavis.models.vlm import VisionLanguageModel, canonical_name

log = logging.getLogger(__name__)


def resolve_weights_path(path: str) -> Path:
    """A weights file or sharded weights directory, a checkpoint directory, or an output directory
    (its newest checkpoint) -> the weights (``model.safetensors`` or the sharded ``model/``). A
    directory whose ``meta.json`` names a ``weights_file`` (from-qwen-vl's output: the adapter; its
    config.yaml names the other files) -> that file."""
    p = Path(path)
    if p.is_file() or is_sharded(p):
        return p
    if (p / META_NAME).is_file() and read_meta(p).get("weights_file"):
        return p / read_meta(p)["weights_file"]
    if (p / WEIGHTS_NAME).is_file() or is_sharded(p / SHARDED_WEIGHTS_NAME):
        return weights_path(p)
    found = list_checkpoints(p)
    if found:
        return weights_path(found[-1])
    raise FileNotFoundError(f"no checkpoint at {path} (expected a .safetensors file, a checkpoint "
                            "directory or a run's output_dir)")


def load_stage_checkpoint(model: VisionLanguageModel, path: str) -> None:
    """Start from an earlier stage's weights (trainable-only or full), reporting what was not covered."""
    try:
        file = resolve_weights_path(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.load_from: {err}") from None
    state = load_weights_file(file)
    missing, unexpected = model.load_weights(state, str(file), checkpoint_lora_scales(file))
    if unexpected:
        raise ValueError(f"model.load_from {file}: {len(unexpected)} keys are not in this model, e.g. {unexpected[:5]}")
    loaded = Counter(k.split(".", 1)[0] for k in state)
    # Parameters only: buffers are derived (e.g. sin-cos tables), tied weights appear once.
    as_built = set(missing)
    kept = Counter(name.split(".", 1)[0] for name, _ in model.named_parameters() if name in as_built)
    log.info(
        "model.load_from %s: loaded %s; not in the checkpoint (kept as built): %s",
        file, dict(loaded) or "nothing", dict(kept) or "none",
    )
    if not loaded:
        raise ValueError(f"model.load_from {file}: the checkpoint holds no weights")


def run_dir_of(weights_file: Path) -> Path | None:
    """The run output directory (holding ``config.yaml``) a checkpoint's weights file belongs to, if any."""
    for parent in weights_file.resolve().parents[:3]:  # <run>/checkpoints/<step or best>/model.safetensors
        if (parent / CONFIG_NAME).is_file() and (parent / "checkpoints").is_dir():
            return parent
    return None


def config_of(weights_file: Path) -> Path | None:
    """The ``config.yaml`` a model's weights were trained with: the checkpoint's own (checkpoints
    and exports carry one), else its run's."""
    own = weights_file.parent / CONFIG_NAME
    if own.is_file():
        return own
    run = run_dir_of(weights_file)
    return run / CONFIG_NAME if run else None


def checkpoint_lora_scales(weights_file: Path) -> dict[str, float] | None:
    """``alpha / r`` per LoRA component of the run that wrote ``weights_file`` (from its config.yaml)."""
    from omegaconf import OmegaConf

    config = config_of(Path(weights_file))
    if config is None:
        return None
    policies = OmegaConf.to_container(OmegaConf.load(config)).get("model", {}).get("freeze") or {}
    return lora_scales(policies)


def weights_chain(path: str) -> list[Path]:
    """The weight files that make up a trained model, oldest first.

    A checkpoint saved with ``run.save_weights: trainable`` holds only what its run trained; the rest
    (e.g. a frozen ViT) came from that run's ``model.load_from``, which is followed (from the run's
    ``config.yaml``) until a checkpoint with full weights, or a plain weights file, is reached.
    """
    from omegaconf import OmegaConf

    chain: list[Path] = []
    file = resolve_weights_path(path)
    while True:
        if file in chain:
            raise ValueError(f"model.load_from chain loops back to {file}")
        chain.insert(0, file)
        meta_path = file.parent / META_NAME
        if not meta_path.is_file() or json.loads(meta_path.read_text()).get("weights") != "trainable":
            return chain
        config = config_of(file)
        earlier = OmegaConf.load(config).model.load_from if config else None
        if not earlier:
            log.warning("%s holds trainable weights only and its run names no model.load_from; "
                        "the other weights are as built from the config", file)
            return chain
        try:
            file = resolve_weights_path(earlier)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{file} holds trainable weights only; the rest comes from its run's model.load_from "
                f"'{earlier}' ({config}), which is not found from {Path.cwd()}"
            ) from None


def load_trained(model: VisionLanguageModel, path: str) -> set[str]:
    """Load a trained model's weights for inference or evaluation (see :func:`weights_chain`); returns
    the names of the parameters no checkpoint held (as built: pretrained files or initialisation)."""
    chain = weights_chain(path)
    covered: set[str] = set()
    everything = set(model.state_dict())
    for file in chain:
        missing, unexpected = model.load_weights(load_weights_file(file), str(file), checkpoint_lora_scales(file))
        if unexpected:
            raise ValueError(f"{file}: {len(unexpected)} keys are not in this model, e.g. {unexpected[:5]}")
        covered |= everything - set(missing)
    as_built = {canonical_name(name) for name, _ in model.named_parameters() if name not in covered}
    kept = Counter(name.split(".", 1)[0] for name in as_built)
    log.info("loaded %s; not in any checkpoint (as built): %s", " <- ".join(map(str, chain[::-1])), dict(kept) or "none")
    return as_built
