"""Qwen-VL releases and our directories on disk: reading a release (config.json, weights sharded or
whole, qwen.tiktoken) with errors naming the path and what was expected, and writing either layout
(staged, with --overwrite moving an earlier OUT aside)."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lavis.interop.convert.layout import (
    RELEASE_GENERATION_CONFIG,
    RELEASE_TOKENIZER_CONFIG,
    ConversionError,
    qwen2_config,
    qwen_vl_config,
    to_original,
    to_ours,
)
from lavis.interop.output import check_output, model_inputs, staged_output

log = logging.getLogger("lavis.convert")

TOKENIZER_FILE = "qwen.tiktoken"
VISION_FILE = "vision.safetensors"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_PREFIX = "adapter."  # the composite model's name for it: ADAPTER_FILE is read by model.load_from
CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py", "tokenization_qwen.py")


# --------------------------------------------------------------------------- from-qwen-vl


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        content = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(content).__name__}")
    return content


# What original_shapes, qwen2_config and check_convertible read from a release's config.json.
RELEASE_KEYS = ("hidden_size", "intermediate_size", "kv_channels", "layer_norm_epsilon", "max_position_embeddings",
                "num_attention_heads", "num_hidden_layers", "rotary_emb_base", "vocab_size")
RELEASE_VISUAL_KEYS = ("heads", "layers", "mlp_ratio", "output_dim", "patch_size", "width")
EXPECTED_RELEASE = ("expected a local copy of Qwen-VL or Qwen-VL-Chat as released (config.json with model_type "
                    "'qwen' and a 'visual' section, its weights, qwen.tiktoken)")


def what_it_is(path: Path) -> str:
    """A hint naming what ``path`` looks like when it is not what a command reads ("" if nothing known)."""
    config = path / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError):
            pass
    if (path / VISION_FILE).is_file() or (path / ADAPTER_FILE).is_file():
        return ("; it looks like from-qwen-vl's output (already converted): lavis.load_model and lavis.chat --ckpt "
                "take it as it is, or use it as model.llm.pretrained over configs/models/presets/qwen_vl_chat.yaml")
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        return "; it looks like a model trained or exported here: to-qwen-vl converts it to Qwen-VL's layout"
    if model_type == "qwen" and (path / TOKENIZER_FILE).is_file():
        return "; it looks like a Qwen-VL release: from-qwen-vl converts it"
    return ""


def read_release_config(src: Path) -> dict[str, Any]:
    """A release's config.json, after checking that it is Qwen-VL's (its model type, its sizes)."""
    if not src.is_dir():
        raise ConversionError(f"{src / 'config.json'} not found: {src} is not a directory; {EXPECTED_RELEASE}")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src / 'config.json'} not found: {src} is not a Qwen-VL release{what_it_is(src)}; "
                              f"{EXPECTED_RELEASE}")
    config = read_json(src / "config.json")
    model_type = config.get("model_type")
    if model_type != "qwen" or not isinstance(config.get("visual"), dict):
        found = f"model_type {model_type!r}" + ("" if isinstance(config.get("visual"), dict) else " and no 'visual' section")
        raise ConversionError(f"{src} is not a Qwen-VL release: its config.json has {found}{what_it_is(src)}; "
                              f"{EXPECTED_RELEASE}")
    missing = [k for k in RELEASE_KEYS if k not in config]
    missing += [f"visual.{k}" for k in RELEASE_VISUAL_KEYS if k not in config["visual"]]
    if missing:
        raise ConversionError(f"{src}/config.json lacks {', '.join(missing)}: {EXPECTED_RELEASE}")
    return config


def check_convertible(config: dict[str, Any], source: Path) -> None:
    """Refuse what the Qwen2 + timm layout cannot hold."""
    if "quantization_config" in config:
        raise ConversionError(f"{source}/config.json: a quantized release ({config['quantization_config'].get('quant_method')}); "
                              "convert the full-precision Qwen-VL or Qwen-VL-Chat")
    if config.get("rotary_pct", 1.0) != 1.0 or not config.get("no_bias", True):
        raise ConversionError(f"{source}/config.json: rotary_pct != 1 or no_bias false have no Qwen2 equivalent")
    if config["kv_channels"] * config["num_attention_heads"] != config["hidden_size"]:
        raise ConversionError(f"{source}/config.json: kv_channels x num_attention_heads != hidden_size")
    if config["visual"]["output_dim"] != config["hidden_size"]:
        raise ConversionError(f"{source}/config.json: visual.output_dim != hidden_size")


def weight_files(src: Path) -> list[Path]:
    """The checkpoint files of a release: the shards its index json names, or one whole file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: no weight_map (expected {{tensor name: shard file}}, as published)")
            shards = sorted(set(map(str, weight_map.values())))
            absent = [name for name in shards if not (src / name).is_file()]
            if absent:
                raise ConversionError(f"{index}: {len(absent)} of its {len(shards)} shards are missing: {absent}")
            return [src / name for name in shards]
    for whole in ("model.safetensors", "pytorch_model.bin"):
        if (src / whole).is_file():
            return [src / whole]
    raise ConversionError(f"{src}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def load_original(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a release (safetensors, or ``.bin`` read with ``weights_only=True``)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(src):
        try:
            part = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # name neither file nor format
            raise ConversionError(f"{file}: cannot be read as {'safetensors' if file.suffix == '.safetensors' else 'a torch state dict'} "
                                  f"({type(err).__name__}: {err})") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ConversionError(f"{file}: not a state dict of tensors")
        state.update(part)
    return state


def save_weights(state: dict[str, torch.Tensor], out: Path) -> None:
    """``model.safetensors``, or shards of 5 GB and their ``model.safetensors.index.json`` (what both
    transformers and Qwen-VL's code read)."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, out, max_shard_size="5GB")


def from_qwen_vl(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert the Qwen-VL release at ``src`` into ``out`` (see ``python -m lavis.convert --help``); ``overwrite``:
    a non-empty ``out`` is moved aside first."""
    src = Path(src)
    inputs = [(src, True)]
    out = check_output(out, inputs, overwrite, ConversionError)
    config = read_release_config(src)
    check_convertible(config, src)
    tokenizer = src / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ConversionError(f"{tokenizer} not found (Qwen-VL's tokenizer file is part of the release)")
    parts = to_ours(load_original(src), config, str(src))
    with staged_output(out, inputs, overwrite, ConversionError) as staging:
        save_file(parts["vision"], str(staging / VISION_FILE), metadata={"format": "pt"})
        adapter = {ADAPTER_PREFIX + name: tensor for name, tensor in parts["adapter"].items()}
        save_file(adapter, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
        qwen2_config(config, parts["llm"]["lm_head.weight"].dtype).save_pretrained(staging)
        save_weights(parts["llm"], staging)
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        write_model_config(staging, out, config, parts["llm"]["lm_head.weight"].dtype)
        (staging / "meta.json").write_text(json.dumps(
            {"weights": "converted", "weights_file": ADAPTER_FILE, "converted_from": str(src)}, indent=2) + "\n")
    log.info("converted %s to %s: lavis.load_model(%s) and python -m lavis.chat --ckpt %s load it (its config.yaml), as "
             "does configs/models/presets/qwen_vl_chat.yaml with model.llm.pretrained=%s", src, out, out, out, out)
    return out


def write_model_config(staging: Path, out: Path, config: dict[str, Any], dtype: torch.dtype) -> None:
    """``config.yaml``: configs/models/presets/qwen_vl_chat.yaml at the release's sizes. Its files are named
    through ``model.llm.pretrained`` (``${model.llm.pretrained}/vision.safetensors`` ...), which
    :func:`lavis.models.loading.model_config` sets to the directory the config lies in when it is loaded."""
    from omegaconf import OmegaConf

    from lavis.common.config import load_config
    from lavis.common.resources import CONFIG_ROOT

    visual = config["visual"]
    kwargs = (f"{{patch_size: {visual['patch_size']}, embed_dim: {visual['width']}, depth: {visual['layers']}, "
              f"num_heads: {visual['heads']}, mlp_ratio: {visual['mlp_ratio']}, pre_norm: true, final_norm: false}}")
    options = [f"model.llm.pretrained={Path(out).absolute()}", f"model.vision.image_size={visual['image_size']}",
               f"model.vision.model_kwargs={kwargs}", f"model.llm.dtype={str(dtype).removeprefix('torch.')}",
               "model.llm.config=null"]  # the architecture is OUT's config.json
    raw = load_config(CONFIG_ROOT / "models" / "presets" / "qwen_vl_chat.yaml", options).raw
    model = raw["model"]
    model["vision"]["pretrained"] = "${model.llm.pretrained}/" + VISION_FILE
    model["tokenizer"]["path"] = "${model.llm.pretrained}"
    model["load_from"] = "${model.llm.pretrained}/" + ADAPTER_FILE
    (staging / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))


# --------------------------------------------------------------------------- to-qwen-vl


def own_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A component's state dict by canonical names (no activation-checkpoint wrapper prefixes)."""
    from lavis.models.vlm import canonical_name

    return {canonical_name(k): v for k, v in module.state_dict().items()}


def to_qwen_vl(run: str | Path, out: str | Path, code_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a model trained here (``run``: as :func:`lavis.load_model` takes it) in Qwen-VL's layout;
    ``overwrite``: a non-empty ``out`` is moved aside first."""
    run = Path(run)
    try:
        inputs = model_inputs(run)
    except FileNotFoundError as err:
        raise ConversionError(f"{err}{what_it_is(run) if run.is_dir() else ''}") from None
    if code_from is not None:
        inputs.append((Path(code_from), True))
    out = check_output(out, inputs, overwrite, ConversionError)
    with staged_output(out, inputs, overwrite, ConversionError) as staging:
        write_qwen_vl(run, staging, code_from)
    log.info("wrote %s in Qwen-VL's layout to %s", run, out)
    return out


def write_qwen_vl(run: str | Path, out: Path, code_from: str | Path | None = None) -> Path:
    """:func:`to_qwen_vl` into ``out``, a new or empty directory this command owns (no checks on it)."""
    from lavis.models.loading import load_model, model_config
    from lavis.models.weights import config_of, resolve_weights_path

    config_file = config_of(resolve_weights_path(str(run)))
    if config_file is None:
        hint = what_it_is(Path(run)) if Path(run).is_dir() else ""
        raise ConversionError(f"{run}: no config.yaml in the checkpoint or its run{hint}; expected a model trained "
                              "here (a run's output_dir, a checkpoint directory or an export)")
    cfg = model_config(config_file)
    if cfg.model.tokenizer.type != "qwen_tiktoken":
        raise ConversionError(f"{run}: Qwen-VL's code reads qwen.tiktoken; this model's tokenizer is "
                              f"'{cfg.model.tokenizer.type}' (model.tokenizer.type: qwen_tiktoken)")
    if not cfg.model.tokenizer.params.get("path"):
        raise ConversionError(f"{config_file}: model.tokenizer.path is not set (the qwen.tiktoken file or its directory)")
    tokenizer_file = Path(cfg.model.tokenizer.params["path"])
    tokenizer_file = tokenizer_file / TOKENIZER_FILE if tokenizer_file.is_dir() else tokenizer_file
    if not tokenizer_file.is_file():
        raise ConversionError(f"{tokenizer_file} not found (model.tokenizer.path of {config_file})")
    if code_from is not None:
        check_code(Path(code_from))
    model, processors = load_model(run, device="cpu")
    tokenizer = processors.tokenizer
    if (tokenizer.img_end_id, tokenizer.img_pad_id) != (tokenizer.img_start_id + 1, tokenizer.img_start_id + 2):
        raise ConversionError("Qwen-VL's code needs <img>, </img>, <imgpad> at consecutive ids")
    config = qwen_vl_config(model, tokenizer.img_start_id)
    llm = own_state(model.llm)
    llm.setdefault("lm_head.weight", llm["model.embed_tokens.weight"].clone())  # tied here, separate in Qwen-VL
    parts = {"vision": own_state(model.vision.model), "adapter": own_state(model.adapter), "llm": llm}
    state = to_original(parts, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in state.items()}, out)
    for name, content in (("config.json", config), ("generation_config.json", RELEASE_GENERATION_CONFIG),
                          ("tokenizer_config.json", RELEASE_TOKENIZER_CONFIG)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    if code_from is not None:
        copy_code(Path(code_from), out)
    return out


def check_code(release: Path) -> None:
    """``--code-from``: a local release holding Qwen-VL's Python files."""
    absent = [name for name in CODE_FILES if not (release / name).is_file()]
    if absent:
        raise ConversionError(f"--code-from {release}: missing {absent} (expected a local copy of Qwen-VL or "
                              "Qwen-VL-Chat as released, with its Python files)")


def copy_code(release: Path, out: Path) -> None:
    """Copy Qwen-VL's Python files from a local release (they are not part of this repository)."""
    check_code(release)
    for name in CODE_FILES:
        shutil.copyfile(release / name, out / name)
