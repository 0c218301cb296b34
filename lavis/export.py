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
``--format qwen-vl`` writes ``OUT/qwen_vl/``: the whole model in Qwen-VL's original layout and config
(``python -m lavis.convert to-qwen-vl``), for Qwen-VL's own code, web demo and evaluation scripts.
Both merge LoRA adapters first.
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
FORMATS = ("lavis", "hf", "qwen-vl")


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
    from lavis.models import config_of, resolve_weights_path, weights_chain

    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    if merge_lora or format != "lavis":
        weights = "full"
        merge_lora = True
    file = resolve_weights_path(str(source))
    config = config_of(file)
    if config is None:
        raise FileNotFoundError(f"{source}: no config.yaml in the checkpoint or its run")
    raw = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    chain = weights_chain(str(source)) if weights == "full" else [file]
    merged: list[str] = []
    if weights == "full":
        state, merged = whole_model_state(source, config, merge_lora)
        raw["model"]["freeze"].update({name: {"type": "trainable"} for name in merged})
        raw["model"]["load_from"] = None
    else:
        state = ckpt.load_weights_file(file)
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
        "merged_lora": merged,
    }
    (out / ckpt.META_NAME).write_text(json.dumps(meta, indent=2))
    if format == "hf":
        write_hf_llm(out)
    elif format == "qwen-vl":
        from lavis.convert import to_qwen_vl

        to_qwen_vl(out, out / "qwen_vl")
    log.info("exported %d tensors (%s weights) from %s to %s", len(state), weights, " <- ".join(map(str, chain[::-1])), out)
    return out


def whole_model_state(source: str | Path, config: Path, merge_lora: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every weight of the model ``source`` holds: built from its run's config (pretrained files
    included), its checkpoints loaded along the ``load_from`` chain, LoRA folded in if ``merge_lora``.
    Returns the state (canonical names) and the components whose adapters were merged; parameters
    that come neither from a checkpoint nor from a pretrained file (random initialisation) are an error."""
    from lavis.models import build_model, load_trained
    from lavis.models.freeze import LoRA, merge_lora as fold
    from lavis.models.vlm import canonical_name

    cfg = load_config(config)
    model, _ = build_model(dataclasses.replace(cfg.model, load_from=None))
    as_built = load_trained(model, str(source))
    from_files = {name for name in model.COMPONENTS if getattr(cfg.model, name).params.get("pretrained")}
    missing = sorted(n for n in as_built if n.split(".", 1)[0] not in from_files)
    if missing:
        raise ValueError(f"{source}: {len(missing)} parameters are in no checkpoint of the load_from chain and in no "
                         f"pretrained file, e.g. {missing[:5]}; export --weights trainable instead")
    merged = [name for name, policy in model.freeze_policies.items() if merge_lora and isinstance(policy, LoRA)]
    for name in merged:
        fold(getattr(model, name))
    # The state dict less the second name of tied parameters (safetensors stores a tensor once).
    parameters = dict(model.named_parameters())
    tied = {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter) and k not in parameters}
    return {canonical_name(k): v.detach() for k, v in model.state_dict().items() if k not in tied}, merged


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
                        help="hf: also OUT/llm/, the language model as a transformers directory; qwen-vl: also "
                             "OUT/qwen_vl/, Qwen-VL's original layout (both merge LoRA)")
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
