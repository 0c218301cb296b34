"""Consolidate a checkpoint into one ``model.safetensors``: ``python -m lavis.export RUN_OR_CHECKPOINT OUT``.

Reads either layout (a sharded FSDP checkpoint is gathered into whole tensors in this one process,
whatever number of ranks wrote it) and writes ``OUT/`` as a self-describing checkpoint directory:
``model.safetensors``, ``config.yaml`` and ``meta.json``. ``lavis.load_model(OUT)``, ``evaluate.py``
and ``model.load_from=OUT`` read it.

``--weights trainable`` (default) writes what the checkpoint holds; ``--weights full`` completes a
trainable-only checkpoint from its run's ``model.load_from`` chain, so OUT stands alone (its
config's ``model.load_from`` is cleared). ``--merge-lora`` (implies ``--weights full``) folds LoRA
adapters into the weights they adapt: OUT is a plain model (its config's LoRA policies become
``trainable``). ``--dtype`` casts floating tensors (e.g. ``bfloat16`` to halve the file for inference).

``--format hf`` writes, besides, ``OUT/llm/``: the language model alone as a transformers directory
(``save_pretrained``, safetensors) that ``AutoModelForCausalLM.from_pretrained`` loads.
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
FORMATS = ("lavis", "hf")


def export(
    source: str | Path,
    out: str | Path,
    weights: str = "trainable",
    dtype: str | None = None,
    merge_lora: bool = False,
    format: str = "lavis",
) -> Path:
    """Write ``out/model.safetensors`` (+ ``config.yaml``, ``meta.json``; ``llm/`` with ``format="hf"``)
    from a run or checkpoint."""
    from lavis.models import build_model, config_of, resolve_weights_path, weights_chain
    from lavis.models.freeze import lora_scales, merge_lora_state

    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    if merge_lora or format == "hf":
        weights = "full"
        merge_lora = True
    file = resolve_weights_path(str(source))
    config = config_of(file)
    if config is None:
        raise FileNotFoundError(f"{source}: no config.yaml in the checkpoint or its run")
    chain = weights_chain(str(source)) if weights == "full" else [file]
    state: dict[str, torch.Tensor] = {}
    for part in chain:
        state.update(ckpt.load_weights_file(part))
    raw = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    merged = lora_scales(raw["model"]["freeze"]) if merge_lora else {}
    if merged:
        state = merge_lora_state(state, merged)
        raw["model"]["freeze"].update({name: {"type": "trainable"} for name in merged})
    if weights == "full":
        cfg = load_config(config, [f"model.freeze.{name}=trainable" for name in merged])
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
        "merged_lora": sorted(merged),
    }
    (out / ckpt.META_NAME).write_text(json.dumps(meta, indent=2))
    if format == "hf":
        write_hf_llm(out)
    log.info("exported %d tensors (%s weights) from %s to %s", len(state), weights, " <- ".join(map(str, chain[::-1])), out)
    return out


def write_hf_llm(export_dir: Path) -> Path:
    """``export_dir/llm/``: the exported model's language model as a transformers directory."""
    from lavis.models import build_model, load_trained

    cfg = load_config(export_dir / ckpt.CONFIG_NAME)
    model, _ = build_model(dataclasses.replace(cfg.model, load_from=None))
    load_trained(model, str(export_dir))
    target = export_dir / "llm"
    model.llm.save_pretrained(target, safe_serialization=True)
    log.info("wrote the language model as a transformers directory to %s", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run's output_dir (its newest checkpoint), a checkpoint directory or weights")
    parser.add_argument("out", help="directory to write model.safetensors, config.yaml and meta.json into")
    parser.add_argument("--weights", choices=("trainable", "full"), default="trainable")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (implies --weights full)")
    parser.add_argument("--format", choices=FORMATS, default="lavis",
                        help="hf: also OUT/llm/, the language model as a transformers directory (merges LoRA)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export(args.source, args.out, args.weights, args.dtype, args.merge_lora, args.format)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
