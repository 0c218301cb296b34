"""Consolidate a checkpoint into one ``model.safetensors``: ``python -m lavis.export RUN_OR_CHECKPOINT OUT``.

Reads either layout (a sharded FSDP checkpoint is gathered into whole tensors in this one process,
whatever number of ranks wrote it) and writes ``OUT/`` as a self-describing checkpoint directory:
``model.safetensors``, ``config.yaml`` and ``meta.json``. ``lavis.load_model(OUT)``, ``evaluate.py``
and ``model.load_from=OUT`` read it.

``--weights trainable`` (default) writes what the checkpoint holds; ``--weights full`` completes a
trainable-only checkpoint from its run's ``model.load_from`` chain, so OUT stands alone (its
config's ``model.load_from`` is cleared). ``--dtype`` casts floating tensors (e.g. ``bfloat16`` to
halve the file for inference).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lavis.common import checkpoint as ckpt
from lavis.common.config import load_config
from lavis.common.logging import setup_logging

log = logging.getLogger("lavis.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(source: str | Path, out: str | Path, weights: str = "trainable", dtype: str | None = None) -> Path:
    """Write ``out/model.safetensors`` (+ ``config.yaml``, ``meta.json``) from a run or checkpoint."""
    from lavis.models import build_model, config_of, resolve_weights_path, weights_chain

    file = resolve_weights_path(str(source))
    config = config_of(file)
    if config is None:
        raise FileNotFoundError(f"{source}: no config.yaml in the checkpoint or its run")
    chain = weights_chain(str(source)) if weights == "full" else [file]
    state: dict[str, torch.Tensor] = {}
    for part in chain:
        state.update(ckpt.load_weights_file(part))
    raw = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    if weights == "full":
        cfg = load_config(config)
        model, _ = build_model(dataclasses.replace(cfg.model, load_from=None), meta=True)
        from lavis.runners.strategies import parameter_names

        missing = sorted(parameter_names(model) - set(state))
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} parameters are in no checkpoint of the chain "
                f"({' <- '.join(map(str, chain[::-1]))}), e.g. {missing[:5]}; export --weights trainable instead"
            )
        raw["model"]["load_from"] = None
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ckpt.WEIGHTS_NAME))
    (out / ckpt.CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    source_meta = ckpt.read_meta(file.parent) if (file.parent / ckpt.META_NAME).is_file() else {}
    meta = {
        "step": source_meta.get("step"),
        "weights": weights,
        "freeze": source_meta.get("freeze"),
        "exported_from": [str(p) for p in chain],
        "dtype": dtype,
    }
    (out / ckpt.META_NAME).write_text(json.dumps(meta, indent=2))
    log.info("exported %d tensors (%s weights) from %s to %s", len(state), weights, " <- ".join(map(str, chain[::-1])), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run's output_dir (its newest checkpoint), a checkpoint directory or weights")
    parser.add_argument("out", help="directory to write model.safetensors, config.yaml and meta.json into")
    parser.add_argument("--weights", choices=("trainable", "full"), default="trainable")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export(args.source, args.out, args.weights, args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
