"""Qwen2-VL / Qwen2.5-VL transformers checkpoints and our directories on disk: ``from-hf`` reads a local
checkpoint (released names ``visual.*``, ``model.*``, ``lm_head.*``, or transformers 5's ``model.visual.*``,
``model.language_model.*``, ``lm_head.*``) into one ``model.safetensors`` in our names with a
self-describing ``config.yaml``; ``to-hf`` writes a model trained here back as a transformers directory.

Names (one to one, no tensor changed): ``visual.merger.X`` <-> ``adapter.X`` (patch_merger),
``visual.X`` <-> ``vision.model.X`` (qwen2_vl_vit), ``model.X`` <-> ``llm.model.X`` and ``lm_head.X`` <->
``llm.lm_head.X`` (qwen2_vl_lm; no ``lm_head`` where the embeddings are tied).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lavis.interop.convert.layout import ConversionError
from lavis.interop.convert.release import load_original, own_state, read_json, save_weights, what_it_is
from lavis.interop.output import check_output, model_inputs, staged_output

log = logging.getLogger("lavis.convert")

KINDS = ("qwen2_vl", "qwen2_5_vl")
COMPONENT_TYPES = {"vision": "qwen2_vl_vit", "adapter": "patch_merger", "llm": "qwen2_vl_lm"}
MERGER_NORM = {"qwen2_vl": "layernorm", "qwen2_5_vl": "rmsnorm"}
WEIGHTS_FILE = "model.safetensors"
HF_CONFIG = "hf_config.json"  # the source's config.json, kept in OUT for to-hf
PREPROCESSOR_CONFIG = "preprocessor_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")
# Copied as they are when the source has them (the processor's and generation settings).
OTHER_FILES = (PREPROCESSOR_CONFIG, "video_preprocessor_config.json", "processor_config.json", GENERATION_CONFIG)
SYSTEM_MESSAGE = "You are a helpful assistant."
# released: visual.*, model.*, lm_head.*; transformers5: model.visual.*, model.language_model.*, lm_head.*
LAYOUTS = {
    "released": (("visual.merger.", "adapter."), ("visual.", "vision.model."), ("model.", "llm.model."), ("lm_head.", "llm.lm_head.")),
    "transformers5": (("model.visual.merger.", "adapter."), ("model.visual.", "vision.model."),
                      ("model.language_model.", "llm.model."), ("lm_head.", "llm.lm_head.")),
}
EXPECTED_HF = ("expected a local Qwen2-VL or Qwen2.5-VL checkpoint as transformers writes it (config.json with model_type "
               "'qwen2_vl' or 'qwen2_5_vl', model.safetensors or its shards with model.safetensors.index.json, the tokenizer "
               "files, preprocessor_config.json)")
# Keys of a transformers config dict that are bookkeeping, not architecture.
CONFIG_METADATA = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "model_type")


# --------------------------------------------------------------------------- names


def detect_layout(names: list[str], source: Path) -> str:
    """``released`` or ``transformers5``, from the tensor names; anything else is a ConversionError."""
    modern = any(n.startswith(("model.visual.", "model.language_model.")) for n in names)
    released = any(n.startswith("visual.") for n in names)
    if modern == released:
        what = "both" if modern else "neither"
        raise ConversionError(f"{source}: its tensor names have {what} of the released layout's 'visual.*' and transformers 5's "
                              f"'model.visual.*' / 'model.language_model.*' (e.g. {sorted(names)[:3]}); {EXPECTED_HF}")
    return "transformers5" if modern else "released"


def rename(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """``name`` with the first matching prefix of ``rules`` replaced (None when none matches)."""
    for prefix, replacement in rules:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return None


def renamed(state: dict[str, torch.Tensor], rules) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` under the names ``rules`` give (see :func:`rename`), and the names they give none."""
    out, unknown = {}, []
    for name, tensor in state.items():
        new = rename(name, rules)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    return out, unknown


def to_ours(state: dict[str, torch.Tensor], layout: str, source: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by our names (``vision.model.*``, ``adapter.*``, ``llm.*``)."""
    ours, unknown = renamed(state, LAYOUTS[layout])
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} tensors have no place in the {layout} layout, e.g. {unknown[:5]}; {EXPECTED_HF}")
    return ours


def to_hf_names(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our tensors by the checkpoint names of ``layout`` (the inverse of :func:`to_ours`)."""
    out, unknown = renamed(state, tuple((ours, theirs) for theirs, ours in LAYOUTS[layout]))
    if unknown:
        raise ConversionError(f"our model has tensors Qwen2-VL's layout has no place for: {unknown[:5]}")
    return out


def hf_names(names: list[str], layout: str) -> list[str]:
    """Our names in ``layout`` (for messages)."""
    inverse = tuple((ours, theirs) for theirs, ours in LAYOUTS[layout])
    return sorted(rename(n, inverse) or n for n in names)


# --------------------------------------------------------------------------- from-hf


def hint(path: Path) -> str:
    """What ``path`` looks like, when it is not what from-hf reads ("" if nothing known)."""
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        return ("; it looks like a model trained, exported or converted here: to-hf converts it (qwen2_vl_vit + patch_merger + "
                "qwen2_vl_lm), to-qwen-vl a Qwen-VL one")
    return what_it_is(path)


def run_hint(path: Path) -> str:
    """What ``path`` looks like, when it is not what to-hf reads ("" if nothing known)."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type in KINDS:
        return "; it looks like a transformers Qwen2-VL / Qwen2.5-VL checkpoint: from-hf converts it"
    return what_it_is(path)


def read_hf_config(src: Path) -> dict[str, Any]:
    """A checkpoint's config.json, after checking that it is Qwen2-VL's or Qwen2.5-VL's."""
    if not src.is_dir():
        raise ConversionError(f"{src / 'config.json'} not found: {src} is not a directory; {EXPECTED_HF}")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src / 'config.json'} not found: {src} is not a transformers checkpoint{hint(src)}; "
                              f"{EXPECTED_HF}")
    config = read_json(src / "config.json")
    model_type = config.get("model_type")
    if model_type not in KINDS or not isinstance(config.get("vision_config"), dict):
        found = f"model_type {model_type!r}" + ("" if isinstance(config.get("vision_config"), dict) else " and no 'vision_config'")
        raise ConversionError(f"{src} is not a Qwen2-VL / Qwen2.5-VL checkpoint: its config.json has {found}{hint(src)}; "
                              f"{EXPECTED_HF}")
    if "quantization_config" in config:
        raise ConversionError(f"{src}/config.json: a quantized checkpoint "
                              f"({config['quantization_config'].get('quant_method')}); convert the full-precision model")
    return config


def hf_config_object(config: dict[str, Any], source: Path):
    """transformers' Qwen2VLConfig / Qwen2_5_VLConfig of a config.json (either layout: text keys at the top
    level, as released, or under ``text_config``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    cls = Qwen2VLConfig if config["model_type"] == "qwen2_vl" else Qwen2_5_VLConfig
    try:
        return cls.from_dict(dict(config))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{source}/config.json: transformers cannot read it as {cls.__name__} ({err})") from None


def clean_config(sub: dict[str, Any], kind: str) -> dict[str, Any]:
    """A sub-config as our YAML holds it: its architecture keys and ``model_type: kind``."""
    out = {k: v for k, v in sub.items() if k not in CONFIG_METADATA}
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_type" in rope:
        out["rope_parameters"] = {k: v for k, v in rope.items() if k != "type"}  # released 'type: mrope', read as default
    return {"model_type": kind, **out}


def component_configs(hf) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vision config, text config) of a transformers config, for ``model.vision.config`` / ``model.llm.config``."""
    kind = hf.model_type
    vision = clean_config(hf.vision_config.to_diff_dict(), kind)
    text = clean_config(hf.text_config.to_diff_dict(), kind)
    text["tie_word_embeddings"] = bool(hf.tie_word_embeddings)  # a top-level key of the composite config
    return vision, text


def expected_names(hf) -> set[str]:
    """The tensor names (transformers 5's) of the model ``hf`` describes, from a build on the meta device."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if hf.model_type == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(hf)
    names = set(model.state_dict())
    if hf.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def check_complete(ours: dict[str, torch.Tensor], hf, layout: str, source: Path) -> None:
    """Every tensor the config's architecture has, and no other (the tied ``lm_head`` may be present or not)."""
    expected = {rename(n, LAYOUTS["transformers5"]) for n in expected_names(hf)}
    missing = sorted(expected - set(ours))
    unexpected = sorted(set(ours) - expected - {"llm.lm_head.weight"})
    if missing:
        theirs = hf_names(missing, layout)
        raise ConversionError(f"{source}: {len(missing)} tensors of the architecture its config.json describes are missing "
                              f"from its weights, e.g. {theirs[:5]}; is the checkpoint complete (every shard)?")
    if unexpected:
        theirs = hf_names(unexpected, layout)
        raise ConversionError(f"{source}: {len(unexpected)} tensors are not part of the architecture its config.json "
                              f"describes, e.g. {theirs[:5]}")


def image_processor_values(src: Path) -> dict[str, Any]:
    """``qwen2_vl_image``'s keys from a preprocessor_config.json (``min_pixels`` / ``max_pixels`` at the top
    level, as released, or under ``size: {shortest_edge, longest_edge}``, as transformers 5 writes them)."""
    path = src / PREPROCESSOR_CONFIG
    if not path.is_file():
        raise ConversionError(f"{path} not found (the image processor's settings; copy it from the release the model "
                              "was fine-tuned from)")
    content = read_json(path)
    size = content.get("size") if isinstance(content.get("size"), dict) else {}
    values = {
        "min_pixels": content.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": content.get("max_pixels", size.get("longest_edge")),
        **{key: content.get(key) for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")},
    }
    absent = [k for k, v in values.items() if v is None]
    if absent:
        raise ConversionError(f"{path} lacks {', '.join(absent)} (min_pixels / max_pixels may also be size.shortest_edge / "
                              "size.longest_edge)")
    return values


def video_processor_values(src: Path) -> dict[str, Any]:
    """``qwen2_vl_video``'s keys: from video_preprocessor_config.json when the release has one, else from
    preprocessor_config.json, as transformers' Qwen2VLVideoProcessor reads them (a Qwen2-VL release's videos
    take the images' pixel budget per frame); the frame rate and counts when given."""
    path = src / "video_preprocessor_config.json"
    content = read_json(path if path.is_file() else src / PREPROCESSOR_CONFIG)
    size = content.get("size") if isinstance(content.get("size"), dict) else {}
    values = {"min_pixels": content.get("min_pixels", size.get("shortest_edge")),
              "max_pixels": content.get("max_pixels", size.get("longest_edge")),
              **{key: content.get(key) for key in ("image_mean", "image_std", "fps", "min_frames", "max_frames")}}
    return {key: value for key, value in values.items() if value is not None}


def check_tokenizer(src: Path) -> None:
    if not (src / "tokenizer_config.json").is_file() or not (
            (src / "tokenizer.json").is_file() or ((src / "vocab.json").is_file() and (src / "merges.txt").is_file())):
        raise ConversionError(f"{src}: no tokenizer (tokenizer_config.json with tokenizer.json, or vocab.json and merges.txt); "
                              f"{EXPECTED_HF}")


def from_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert the Qwen2-VL / Qwen2.5-VL checkpoint at ``src`` into ``out`` (see ``python -m lavis.convert --help``);
    ``overwrite``: a non-empty ``out`` is moved aside first."""
    src = Path(src)
    inputs = [(src, True)]
    out = check_output(out, inputs, overwrite, ConversionError)
    config = read_hf_config(src)
    hf = hf_config_object(config, src)
    check_tokenizer(src)
    image_values = image_processor_values(src)
    video_values = video_processor_values(src)
    state = load_original(src)
    layout = detect_layout(list(state), src)
    ours = to_ours(state, layout, src)
    check_complete(ours, hf, layout, src)
    dtype = ours["llm.model.embed_tokens.weight"].dtype
    with staged_output(out, inputs, overwrite, ConversionError) as staging:
        save_file({k: v.contiguous() for k, v in ours.items()}, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        for name in (*TOKENIZER_FILES, *OTHER_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        shutil.copyfile(src / "config.json", staging / HF_CONFIG)
        write_hf_model_config(staging, out, hf, dtype, image_values, video_values)
        (staging / "meta.json").write_text(json.dumps(
            {"weights": "converted", "weights_file": WEIGHTS_FILE, "converted_from": str(src.absolute()),
             "located_keys": ["model.tokenizer.path"], "hf_layout": layout}, indent=2) + "\n")
    log.info("converted %s (%s, %s layout) to %s: lavis.load_model(%s) and python -m lavis.chat --ckpt %s load it (its "
             "config.yaml), model.load_from=%s starts a training from it", src, hf.model_type, layout, out, out, out, out)
    return out


def write_hf_model_config(staging: Path, out: Path, hf, dtype: torch.dtype, image_values: dict[str, Any],
                          video_values: dict[str, Any]) -> None:
    """``config.yaml``: configs/default.yaml with the three components at the checkpoint's architecture (inline
    configs, no pretrained files: the weights are OUT's model.safetensors), its tokenizer (``model.tokenizer.path``,
    which :func:`lavis.models.loading.model_config` sets to the directory the config lies in, per meta.json's
    ``located_keys``) and its image and video processors; validated by loading it back."""
    from omegaconf import OmegaConf

    from lavis.common.config import load_config
    from lavis.common.resources import CONFIG_ROOT
    from lavis.processors.tokenizer import QWEN2_VL_SPECIAL_TOKENS

    kind = hf.model_type
    vision_config, text_config = component_configs(hf)
    dtype_name = str(dtype).removeprefix("torch.")
    blocks = {
        "vision": {"type": COMPONENT_TYPES["vision"], "config": vision_config, "pretrained": None, "dtype": dtype_name},
        "adapter": {"type": COMPONENT_TYPES["adapter"], "merge_size": hf.vision_config.spatial_merge_size, "norm": MERGER_NORM[kind]},
        "llm": {"type": COMPONENT_TYPES["llm"], "config": text_config, "pretrained": None, "dtype": dtype_name},
        "tokenizer": {"type": "hf_tokenizer", "path": str(Path(out).absolute()), "special_tokens": dict(QWEN2_VL_SPECIAL_TOKENS)},
        "image_processor": {"type": "qwen2_vl_image", **image_values},
        "video_processor": {"type": "qwen2_vl_video", **video_values},
    }
    options = [f"model.{key}={json.dumps(block)}" for key, block in blocks.items()]
    options += [f"model.system_message={json.dumps(SYSTEM_MESSAGE)}", "model.load_from=null"]
    raw = load_config(CONFIG_ROOT / "default.yaml", options).raw
    for key in ("vision", "llm"):  # exactly the checkpoint's (the type's default YAML merged no key of another family in)
        raw["model"][key]["config"] = blocks[key]["config"]
    path = staging / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    load_config(path, [f"model.tokenizer.path={Path(out).absolute()}"])  # it validates as it will be read


# --------------------------------------------------------------------------- to-hf


def to_hf(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a model trained here (``run``: as :func:`lavis.load_model` takes it) whose components are
    qwen2_vl_vit + patch_merger + qwen2_vl_lm as a transformers Qwen2-VL / Qwen2.5-VL directory;
    ``overwrite``: a non-empty ``out`` is moved aside first."""
    run = Path(run)
    try:
        inputs = model_inputs(run)
    except FileNotFoundError as err:
        raise ConversionError(f"{err}{run_hint(run) if run.is_dir() else ''}") from None
    out = check_output(out, inputs, overwrite, ConversionError)
    with staged_output(out, inputs, overwrite, ConversionError) as staging:
        write_hf(run, staging)
    log.info("wrote %s as a transformers checkpoint to %s", run, out)
    return out


def check_components(cfg, source: Path) -> None:
    """Refuse a model that is not qwen2_vl_vit + patch_merger + qwen2_vl_lm with an hf_tokenizer."""
    found = {key: getattr(cfg.model, key).type for key in COMPONENT_TYPES}
    if found != COMPONENT_TYPES:
        have = ", ".join(f"model.{k}.type '{v}'" for k, v in found.items())
        want = ", ".join(f"{k}: {v}" for k, v in COMPONENT_TYPES.items())
        hint = "; to-qwen-vl converts timm_vit + qwen_resampler" if found["adapter"] == "qwen_resampler" else ""
        raise ConversionError(f"{source}: Qwen2-VL's layout needs {want}; this model has {have}{hint}")
    if cfg.model.tokenizer.type != "hf_tokenizer":
        raise ConversionError(f"{source}: Qwen2-VL's tokenizer is a transformers one; this model's is "
                              f"'{cfg.model.tokenizer.type}' (model.tokenizer.type: hf_tokenizer)")


def sub_config_dict(module_config, fallback: dict[str, Any] | None) -> dict[str, Any]:
    """A component's transformers config as a dict (the built module's, else the YAML's inline one)."""
    if module_config is not None and hasattr(module_config, "to_diff_dict"):
        return {k: v for k, v in module_config.to_diff_dict().items() if k not in CONFIG_METADATA}
    return {k: v for k, v in dict(fallback or {}).items() if k not in CONFIG_METADATA}


def build_hf_config(model, tokenizer, cfg, base: dict[str, Any] | None, dtype: torch.dtype, tied: bool):
    """The Qwen2VLConfig / Qwen2_5_VLConfig of a model built here: ``base`` (the source's config.json, when the
    model came from from-hf) updated with the components' configs and sizes and the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    kind = getattr(model.vision, "model_type", None) or dict(cfg.model.vision.params.get("config") or {}).get("model_type")
    if kind not in KINDS:
        raise ConversionError(f"model.vision.config.model_type: {kind!r}, expected one of {', '.join(KINDS)}")
    cls = Qwen2VLConfig if kind == "qwen2_vl" else Qwen2_5_VLConfig
    merged: dict[str, Any] = {}
    if base is not None:
        if base.get("model_type") != kind:
            raise ConversionError(f"the source's config.json is a {base.get('model_type')!r} model, this one's vision "
                                  f"encoder a {kind!r} one")
        merged = cls.from_dict(dict(base)).to_diff_dict()
    vision = {**(merged.get("vision_config") or {}),
              **sub_config_dict(getattr(model.vision.model, "config", None), cfg.model.vision.params.get("config"))}
    text = {**(merged.get("text_config") or {}),
            **sub_config_dict(getattr(model.llm, "config", None), cfg.model.llm.params.get("config"))}
    text.pop("tie_word_embeddings", None)
    # Keys of another family (e.g. Qwen2-VL's embed_dim / mlp_ratio, which qwen2_vl_vit's default YAML merges under a
    # Qwen2.5-VL config) are not written; the source's own keys are kept.
    for sub, fields in (("vision_config", vision), ("text_config", text)):
        known = set(cls.sub_configs[sub]().to_dict()) | set(merged.get(sub) or {})
        for key in [k for k in fields if k not in known]:
            fields.pop(key)
    embeddings = model.llm.get_input_embeddings()
    text.update(vocab_size=embeddings.num_embeddings, hidden_size=embeddings.embedding_dim)
    # The merger's output is the LLM's width: Qwen2-VL's vision hidden_size, Qwen2.5-VL's out_hidden_size.
    vision["hidden_size" if kind == "qwen2_vl" else "out_hidden_size"] = embeddings.embedding_dim
    vision["spatial_merge_size"] = model.adapter.merge_size
    ids = {"image_token_id": tokenizer.img_pad_id, "vision_start_token_id": tokenizer.img_start_id,
           "vision_end_token_id": tokenizer.img_end_id}
    video = tokenizer.hf.convert_tokens_to_ids("<|video_pad|>") if "<|video_pad|>" in tokenizer.hf.get_vocab() else None
    if video is not None:
        ids["video_token_id"] = video
    for sub in ("text_config", "vision_config"):
        merged.pop(sub, None)
    merged = {k: v for k, v in merged.items() if k not in CONFIG_METADATA}
    merged.update(ids, text_config=text, vision_config=vision, tie_word_embeddings=tied)
    config = cls.from_dict(merged)
    config.architectures = [f"{cls.__name__.removesuffix('Config')}ForConditionalGeneration"]
    config.dtype = dtype
    return config


def our_state(model, tied: bool) -> dict[str, torch.Tensor]:
    """The model's tensors by our names (``vision.model.*``, ``adapter.*``, ``llm.*``), the tied lm_head left out."""
    state = {f"vision.model.{k}": v for k, v in own_state(model.vision.model).items()}
    state.update({f"adapter.{k}": v for k, v in own_state(model.adapter).items()})
    state.update({f"llm.{k}": v for k, v in own_state(model.llm).items()})
    if tied:
        state.pop("llm.lm_head.weight", None)
    return state


def check_adapter(model, kind: str) -> None:
    norm = "rmsnorm" if type(model.adapter.ln_q).__name__ == "RMSNorm" else "layernorm"
    if norm != MERGER_NORM[kind]:
        raise ConversionError(f"{kind}'s merger has a {MERGER_NORM[kind]} (model.adapter.norm: {MERGER_NORM[kind]}); "
                              f"this model's patch_merger has a {norm}")
    vision_merge = getattr(model.vision, "merge_size", model.adapter.merge_size)
    if vision_merge != model.adapter.merge_size:
        raise ConversionError(f"model.adapter.merge_size {model.adapter.merge_size} != the vision config's spatial_merge_size "
                              f"{vision_merge}: transformers has one spatial_merge_size")


def write_hf(run: str | Path, out: Path) -> Path:
    """:func:`to_hf` into ``out``, a new or empty directory this command owns (no checks on it)."""
    from lavis.models.freeze import LoRA, merge_lora
    from lavis.models.loading import load_model, model_config
    from lavis.models.weights import config_of, resolve_weights_path

    config_file = config_of(resolve_weights_path(str(run)))
    if config_file is None:
        found = run_hint(Path(run)) if Path(run).is_dir() else ""
        raise ConversionError(f"{run}: no config.yaml in the checkpoint or its run{found}; expected a model trained "
                              "here (a run's output_dir, a checkpoint directory or an export)")
    cfg = model_config(config_file)
    check_components(cfg, config_file)
    tokenizer_path = cfg.model.tokenizer.params.get("path")
    tokenizer_dir = Path(tokenizer_path) if tokenizer_path else None
    if tokenizer_dir is not None and tokenizer_dir.is_file():
        tokenizer_dir = tokenizer_dir.parent
    source_dir = tokenizer_dir if tokenizer_dir is not None and tokenizer_dir.is_dir() else None
    base = read_json(source_dir / HF_CONFIG) if source_dir and (source_dir / HF_CONFIG).is_file() else None
    meta = read_json(source_dir / "meta.json") if source_dir and (source_dir / "meta.json").is_file() else {}
    layout = meta.get("hf_layout", "released")
    if layout not in LAYOUTS:
        raise ConversionError(f"{source_dir / 'meta.json'}: hf_layout {layout!r}, expected one of {', '.join(LAYOUTS)}")

    model, processors = load_model(run, device="cpu")
    for name, policy in model.freeze_policies.items():  # LoRA folded into the weights it adapts
        if isinstance(policy, LoRA):
            merge_lora(getattr(model, name))
    kind = getattr(model.vision, "model_type", None) or cfg.model.vision.params["config"]["model_type"]
    check_adapter(model, kind)
    llm = model.llm
    tied = llm.get_output_embeddings() is not None and (
        llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr())
    dtype = llm.get_input_embeddings().weight.dtype
    config = build_hf_config(model, processors.tokenizer, cfg, base, dtype, tied)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in our_state(model, tied).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in to_hf_names(state, layout).items()}, out)
    config.save_pretrained(out)
    write_processor_files(out, source_dir, processors, cfg, kind)
    return out


def write_processor_files(out: Path, source_dir: Path | None, processors, cfg, kind: str) -> None:
    """The tokenizer files (copied from the tokenizer's directory, else saved by transformers), the
    generation config when the source had one, and preprocessor_config.json with the run's image processor keys."""
    copied = [n for n in TOKENIZER_FILES if source_dir is not None and (source_dir / n).is_file()]
    for name in copied:
        shutil.copyfile(source_dir / name, out / name)
    if not copied:
        processors.tokenizer.hf.save_pretrained(out)
    for name in ("video_preprocessor_config.json", "processor_config.json", GENERATION_CONFIG):
        if source_dir is not None and (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
    params = dict(cfg.model.image_processor.params)
    content: dict[str, Any] = {"image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_normalize": True,
                               "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
                               "processor_class": "Qwen2VLProcessor" if kind == "qwen2_vl" else "Qwen2_5_VLProcessor"}
    if source_dir is not None and (source_dir / PREPROCESSOR_CONFIG).is_file():
        content = read_json(source_dir / PREPROCESSOR_CONFIG)
    content.update({k: params[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
                    if k in params})
    content["image_mean"], content["image_std"] = list(content["image_mean"]), list(content["image_std"])
    has_size, has_keys = "size" in content, "min_pixels" in content  # the source's form (transformers 5's, released)
    if has_size or not has_keys:
        content["size"] = {"shortest_edge": params["min_pixels"], "longest_edge": params["max_pixels"]}
    if has_keys or not has_size:
        content.update(min_pixels=params["min_pixels"], max_pixels=params["max_pixels"])
    (out / PREPROCESSOR_CONFIG).write_text(json.dumps(content, indent=2) + "\n")
