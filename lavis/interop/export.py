"""Consolidate a checkpoint into one ``model.safetensors``: ``python -m lavis.export RUN_OR_CHECKPOINT OUT``.

Reads either layout (a sharded FSDP checkpoint is gathered into whole tensors in this one process,
whatever number of ranks wrote it) and writes ``OUT/`` as a self-describing checkpoint directory:
``model.safetensors``, ``config.yaml`` and ``meta.json``. ``lavis.load_model(OUT)``, ``evaluate.py``
and ``model.load_from=OUT`` read it.

An export is self-contained: ``--weights full`` (default) writes every weight of the model, a
trainable-only checkpoint completed from its run's ``model.load_from`` chain, so OUT stands alone
(``weights: full`` in its meta, its config's ``model.load_from`` cleared). ``--weights trainable``
writes what the checkpoint holds and says so: ``weights: trainable``, ``self_contained: false``, its
config keeps ``model.load_from`` (the earlier stage must be there to load it); a checkpoint that holds
every weight (``run.save_weights: full``) is complete either way and labelled so. ``--merge-lora``
folds LoRA adapters into the weights they adapt: OUT is a plain model (its config's LoRA policies
become ``trainable``). ``--dtype`` casts floating tensors (e.g. ``bfloat16`` to halve the file for inference).

OUT is new or empty: a directory holding anything is refused unless ``--overwrite``, which moves it
aside to ``OUT.old-<time>`` (never deletes it). A training run's directory (or a directory inside
one), the source and what it is made of (its checkpoint, its run, the earlier stages of its
``load_from`` chain) and a directory above them are refused whatever the flags. OUT appears only
once complete: a refused or failed export leaves nothing behind.

``--format hf`` writes, besides, ``OUT/llm/``: the language model alone as a transformers directory
(``save_pretrained``, safetensors) that ``AutoModelForCausalLM.from_pretrained`` loads; for a native-resolution
model (qwen2_vl_vit + patch_merger + qwen2_vl_lm, with an hf_tokenizer) ``OUT/hf/`` instead: the whole model as
a transformers Qwen2-VL / Qwen2.5-VL directory (``python -m lavis.convert to-hf``) that
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` and ``AutoProcessor`` load.
``--format qwen-vl`` writes ``OUT/qwen_vl/``: the whole model in Qwen-VL's original layout and config
(``python -m lavis.convert to-qwen-vl``), for Qwen-VL's own code, web demo and evaluation scripts.
Both merge LoRA adapters first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lavis.common import checkpoint as ckpt
from lavis.common.config import load_config
from lavis.interop.output import check_output, model_inputs, staged_output
from lavis.models.loading import model_config
from lavis.tracking.logging import setup_logging

log = logging.getLogger("lavis.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("lavis", "hf", "qwen-vl")


def holds_every_weight(meta: dict) -> bool:
    """A checkpoint that needs nothing else: saved with ``run.save_weights: full``, or trainable-only
    from a run in which every component trained."""
    if meta.get("weights") == "full":
        return True
    freeze = meta.get("freeze") or {}
    return meta.get("weights") == "trainable" and bool(freeze) and all(
        (p.get("type") if isinstance(p, dict) else p) == "trainable" for p in freeze.values())


def export(
    source: str | Path,
    out: str | Path,
    weights: str = "full",
    dtype: str | None = None,
    merge_lora: bool = False,
    format: str = "lavis",
    overwrite: bool = False,
) -> Path:
    """Write ``out/model.safetensors`` (+ ``config.yaml``, ``meta.json``; ``llm/`` or, for a native-resolution
    model, ``hf/`` with ``format="hf"``)
    from a run or checkpoint; see the module docstring for ``weights`` and ``overwrite``."""
    from lavis.models.weights import config_of, resolve_weights_path, weights_chain

    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    if weights not in ("full", "trainable"):
        raise ValueError(f"unknown weights '{weights}'; expected full or trainable")
    if merge_lora or format != "lavis":
        weights = "full"
        merge_lora = True
    file = resolve_weights_path(str(source))
    try:
        whole_chain, chain_error = weights_chain(str(source)), None
    except (FileNotFoundError, ValueError) as err:  # an earlier stage absent: only a trainable export can do without
        whole_chain, chain_error = None, err
    inputs = model_inputs(source, whole_chain or [file])
    check_output(out, inputs, overwrite)  # before the (long) gathering of the weights
    config = config_of(file)
    if config is None:
        raise FileNotFoundError(f"{source}: no config.yaml in the checkpoint or its run")
    raw = copy.deepcopy(model_config(config).raw)  # a converted directory's files named where it lies now
    if format == "hf" and is_native(raw):
        check_native_for_hf(config)  # before the gathering: a model to-hf cannot write is named now
    source_meta = ckpt.read_meta(file.parent) if (file.parent / ckpt.META_NAME).is_file() else {}
    complete = holds_every_weight(source_meta)
    if weights == "full" and isinstance(chain_error, FileNotFoundError):
        raise FileNotFoundError(f"{chain_error}. A self-contained export needs every stage; --weights trainable "
                                "writes what the checkpoint holds (its load_from kept)") from None
    if weights == "full" and chain_error is not None:
        raise chain_error
    chain = whole_chain if weights == "full" else [file]
    merged: list[str] = []
    if weights == "full" and not merge_lora and chain == [file] and complete:
        state = ckpt.load_weights_file(file)  # the checkpoint is the whole model already
    elif weights == "full":
        state, merged = whole_model_state(source, config, merge_lora)
        raw["model"]["freeze"].update({name: {"type": "trainable"} for name in merged})
    else:
        state = ckpt.load_weights_file(file)
        if complete:
            log.info("%s holds every weight of the model: the export is complete (weights: full)", file)
            weights = "full"
    if weights == "full":
        raw["model"]["load_from"] = None
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    meta = {
        "step": source_meta.get("step"),
        "weights": weights,
        "self_contained": weights == "full",
        "load_from": raw["model"].get("load_from"),
        "freeze": source_meta.get("freeze"),
        "exported_from": [str(p) for p in chain],
        "dtype": dtype,
        "merged_lora": merged,
    }
    with staged_output(out, inputs, overwrite) as staging:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / ckpt.WEIGHTS_NAME))
        (staging / ckpt.CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
        (staging / ckpt.META_NAME).write_text(json.dumps(meta, indent=2))
        if format == "hf" and is_native(raw):
            from lavis.interop.convert.hf_qwen2_vl import write_hf

            write_hf(staging, staging / "hf")
            log.info("wrote the model as a transformers Qwen2-VL directory to %s", staging / "hf")
        elif format == "hf":
            write_hf_llm(staging)
        elif format == "qwen-vl":
            from lavis.interop.convert.release import write_qwen_vl

            write_qwen_vl(staging, staging / "qwen_vl")
    out = Path(os.path.abspath(out))
    if weights == "trainable":
        log.warning("exported the trainable weights only: %s loads with its model.load_from (%s) present",
                    out, raw["model"].get("load_from"))
    log.info("exported %d tensors (%s weights) from %s to %s", len(state), weights, " <- ".join(map(str, chain[::-1])), out)
    return out


def whole_model_state(source: str | Path, config: Path, merge_lora: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every weight of the model ``source`` holds: built from its run's config (pretrained files
    included), its checkpoints loaded along the ``load_from`` chain, LoRA folded in if ``merge_lora``.
    Returns the state (canonical names) and the components whose adapters were merged; parameters
    that come neither from a checkpoint nor from a pretrained file (random initialisation) are an error."""
    from lavis.models import build_model
    from lavis.models.freeze import LoRA
    from lavis.models.freeze import merge_lora as fold
    from lavis.models.vlm import canonical_name
    from lavis.models.weights import load_trained

    cfg = model_config(config)
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


def is_native(raw: dict) -> bool:
    """Whether a config (as a plain dict) is a native-resolution model that ``to-hf`` writes whole:
    qwen2_vl_vit + patch_merger + qwen2_vl_lm."""
    from lavis.interop.convert.hf_qwen2_vl import COMPONENT_TYPES

    model = raw.get("model") or {}
    return all((model.get(key) or {}).get("type") == kind for key, kind in COMPONENT_TYPES.items())


def check_native_for_hf(config: Path) -> None:
    """Refuse, before anything is gathered, a native model that ``to-hf`` cannot write (e.g. a tokenizer that is
    not a transformers one), naming the source's config."""
    from lavis.interop.convert.hf_qwen2_vl import check_components

    try:
        check_components(model_config(config), config)
    except ValueError as err:
        raise ValueError(f"--format hf writes a qwen2_vl_vit + patch_merger + qwen2_vl_lm model as a transformers "
                         f"Qwen2-VL directory: {err}") from None


def write_hf_llm(export_dir: Path) -> Path:
    """``export_dir/llm/``: the exported model's language model as a transformers directory."""
    from lavis.models import build_model
    from lavis.models.weights import load_trained

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
    parser.add_argument("--weights", choices=("full", "trainable"), default="full",
                        help="full (default): every weight, completed from the load_from chain, so OUT stands "
                             "alone; trainable: what the checkpoint holds (OUT keeps its model.load_from)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (implies --weights full)")
    parser.add_argument("--format", choices=FORMATS, default="lavis",
                        help="hf: also OUT/llm/, the language model as a transformers directory (a native-resolution "
                             "model: OUT/hf/, the whole model as a transformers Qwen2-VL directory); qwen-vl: also "
                             "OUT/qwen_vl/, Qwen-VL's original layout (all merge LoRA)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT, its content moved aside to OUT.old-<time> first (never "
                             "deleted); a run's directory and the source are refused whatever this says")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export(args.source, args.out, args.weights, args.dtype, args.merge_lora, args.format, args.overwrite)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
