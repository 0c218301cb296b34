"""Convert between Qwen-VL's released checkpoints and this framework's components.

    python -m lavis.convert from-qwen-vl SRC OUT   # a Qwen-VL / Qwen-VL-Chat release -> our layout
    python -m lavis.convert to-qwen-vl RUN OUT     # a model trained here -> Qwen-VL's layout

``from-qwen-vl`` reads a local copy of the release (``config.json``, safetensors or ``.bin`` weights,
sharded with their index json or whole, ``qwen.tiktoken``; its Python code is never run) and writes
OUT as the Qwen2-architecture transformers directory of the LLM (``config.json`` + safetensors, what
``AutoModelForCausalLM.from_pretrained`` loads) holding also ``vision.safetensors`` (the ViT as a
timm state dict), ``adapter.safetensors`` (the resampler with ``ln_post`` and ``proj``: the model's
``adapter.*`` weights, in ``qwen_resampler``'s naming) and ``qwen.tiktoken``:
``configs/models/presets/qwen_vl_chat.yaml`` with ``model.llm.pretrained=OUT`` assembles them (the
adapter through its ``model.load_from``).

``to-qwen-vl`` loads a trained model as :func:`lavis.load_model` does (a run's ``output_dir``, a
checkpoint directory or an exported model) and writes Qwen-VL's tensor names, ``config.json``,
``generation_config.json``, ``tokenizer_config.json`` and ``qwen.tiktoken``; ``--code-from`` copies
Qwen-VL's Python files from a local release, so that its own code (``trust_remote_code``) loads OUT.

Both name what is wrong with an input that is not what they read (its path and what was expected),
and write OUT as ``lavis.export`` does: a new or empty directory (one that holds anything only with
``--overwrite``, which moves it aside to ``OUT.old-<time>``), never the input, a directory inside or
above it, or a training run's directory; OUT appears only once complete.

What the mapping has to get right (each checked against Qwen-VL's ``visual.py`` / ``modeling_qwen.py``):
the ViT's ``attn.in_proj`` rows are grouped per head (q, k, v of head 0, then head 1, ...) where
timm's ``qkv`` holds all q rows, then all k, then all v; the LLM's ``c_attn`` is [q; k; v] and its
MLP is ``c_proj(w1(x) * silu(w2(x)))``, so ``w2`` is Qwen2's ``gate_proj`` and ``w1`` its ``up_proj``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("lavis.convert")

TOKENIZER_FILE = "qwen.tiktoken"
VISION_FILE = "vision.safetensors"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_PREFIX = "adapter."  # the composite model's name for it: ADAPTER_FILE is read by model.load_from
IMAGE_TOKENS = 256  # Qwen-VL's tokenizer pads every <img>...</img> span to 256 tokens
POS_TABLE_ROWS = 256  # Qwen-VL's ViT builds a 16x16 position table whatever its image size
VISUAL = "transformer.visual."
VIT_BLOCK = VISUAL + "transformer.resblocks.{i}."
LLM_BLOCK = "transformer.h.{i}."
CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py", "tokenization_qwen.py")

# Qwen-VL-Chat's config.json, less its sizes (derived from the model) and the Int4 release's quantization.
RELEASE_CONFIG: dict[str, Any] = {
    "architectures": ["QWenLMHeadModel"],
    "attn_dropout_prob": 0.0,
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "emb_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "model_type": "qwen",
    "no_bias": True,
    "onnx_safe": None,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer",
    "transformers_version": "4.32.0",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
}
RELEASE_GENERATION_CONFIG = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.5, "transformers_version": "4.31.0",
}
RELEASE_TOKENIZER_CONFIG = {
    "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


class ConversionError(ValueError):
    """A source that cannot be converted (missing files or tensors, an unsupported architecture)."""


# --------------------------------------------------------------------------- tensor mapping


def _same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


def _swap_row_groups(tensors: list[torch.Tensor], outer: int, inner: int) -> list[torch.Tensor]:
    """Rows grouped ``[outer, inner, n]`` -> ``[inner, outer, n]``: with (heads, 3) Qwen-VL's ``in_proj``
    (per head: q, k, v) becomes timm's ``qkv`` (all q, all k, all v), with (3, heads) back."""
    (t,) = tensors
    return [t.reshape(outer, inner, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()]


def _split_qkv(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.clone() for part in tensors[0].chunk(3, dim=0)]  # own storage each: safetensors refuses shared views


def _join_qkv(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(tensors, dim=0)]


def _add_batch_dim(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0].unsqueeze(0)]


def _drop_batch_dim(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0][0]]


@dataclass(frozen=True)
class Rule:
    """Qwen-VL tensors ``original`` correspond to our tensors ``ours``; ``to_ours`` / ``to_original``
    map the one list onto the other (exactly: every mapping is a rename, a reshape or a split)."""

    original: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _same
    to_original: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _same


def rename(original: str, ours: str) -> Rule:
    return Rule((original,), (ours,))


@dataclass
class Layout:
    """The rules of the three components, in Qwen-VL's config terms."""

    vision: list[Rule] = field(default_factory=list)
    adapter: list[Rule] = field(default_factory=list)
    llm: list[Rule] = field(default_factory=list)

    def components(self) -> dict[str, list[Rule]]:
        return {"vision": self.vision, "adapter": self.adapter, "llm": self.llm}


def original_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of Qwen-VL's checkpoint for ``config`` (its config.json), with its shape."""
    visual = config["visual"]
    width, output, patch = visual["width"], visual["output_dim"], visual["patch_size"]
    mlp = int(width * visual["mlp_ratio"])  # as visual.py's VisualAttentionBlock
    queries = visual.get("n_queries", IMAGE_TOKENS)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    projection = config["kv_channels"] * config["num_attention_heads"]
    ffn = config["intermediate_size"] // 2
    shapes: dict[str, tuple[int, ...]] = {
        VISUAL + "conv1.weight": (width, 3, patch, patch),
        VISUAL + "positional_embedding": (POS_TABLE_ROWS, width),
        VISUAL + "ln_pre.weight": (width,),
        VISUAL + "ln_pre.bias": (width,),
    }
    vit_block = {
        "ln_1.weight": (width,), "ln_1.bias": (width,),
        "attn.in_proj.weight": (3 * width, width), "attn.in_proj.bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,), "ln_2.bias": (width,),
        "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,),
        "mlp.c_proj.weight": (width, mlp), "mlp.c_proj.bias": (width,),
    }
    for i in range(visual["layers"]):
        shapes.update({VIT_BLOCK.format(i=i) + name: shape for name, shape in vit_block.items()})
    pool = {
        "query": (queries, output), "pos_embed": (queries, output),
        "attn.in_proj_weight": (3 * output, output), "attn.in_proj_bias": (3 * output,),
        "attn.out_proj.weight": (output, output), "attn.out_proj.bias": (output,),
        "ln_q.weight": (output,), "ln_q.bias": (output,), "ln_kv.weight": (output,), "ln_kv.bias": (output,),
    }
    if width != output:
        pool["kv_proj.weight"] = (output, width)
    shapes.update({VISUAL + "attn_pool." + name: shape for name, shape in pool.items()})
    shapes.update({VISUAL + "ln_post.weight": (output,), VISUAL + "ln_post.bias": (output,), VISUAL + "proj": (output, output)})
    shapes.update({"transformer.wte.weight": (vocab, hidden), "transformer.ln_f.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    llm_block = {
        "ln_1.weight": (hidden,), "ln_2.weight": (hidden,),
        "attn.c_attn.weight": (3 * projection, hidden), "attn.c_attn.bias": (3 * projection,),
        "attn.c_proj.weight": (hidden, projection),
        "mlp.w1.weight": (ffn, hidden), "mlp.w2.weight": (ffn, hidden), "mlp.c_proj.weight": (hidden, ffn),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({LLM_BLOCK.format(i=i) + name: shape for name, shape in llm_block.items()})
    return shapes


def layout(config: dict[str, Any]) -> Layout:
    """The correspondence between Qwen-VL's tensors and ours for ``config``."""
    visual = config["visual"]
    vision = [
        rename(VISUAL + "conv1.weight", "patch_embed.proj.weight"),
        Rule((VISUAL + "positional_embedding",), ("pos_embed",), _add_batch_dim, _drop_batch_dim),
        rename(VISUAL + "ln_pre.weight", "norm_pre.weight"),
        rename(VISUAL + "ln_pre.bias", "norm_pre.bias"),
    ]
    vit_renames = {"ln_1": "norm1", "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(visual["layers"]):
        ours, theirs = f"blocks.{i}.", VIT_BLOCK.format(i=i)
        for kind in ("weight", "bias"):
            vision += [rename(f"{theirs}{a}.{kind}", f"{ours}{b}.{kind}") for a, b in vit_renames.items()]
            vision.append(Rule((f"{theirs}attn.in_proj.{kind}",), (f"{ours}attn.qkv.{kind}",),
                               partial(_swap_row_groups, outer=visual["heads"], inner=3),
                               partial(_swap_row_groups, outer=3, inner=visual["heads"])))
    # The resampler keeps visual.py's names (see lavis/models/adapters/qwen_resampler.py).
    adapter = [rename(name, name[len(VISUAL + "attn_pool."):]) for name in original_shapes(config) if name.startswith(VISUAL + "attn_pool.")]
    adapter += [rename(VISUAL + name, name) for name in ("ln_post.weight", "ln_post.bias", "proj")]
    llm = [
        rename("transformer.wte.weight", "model.embed_tokens.weight"),
        rename("transformer.ln_f.weight", "model.norm.weight"),
        rename("lm_head.weight", "lm_head.weight"),
    ]
    llm_renames = {
        "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
        "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj", "mlp.c_proj": "mlp.down_proj",  # c_proj(w1(x) * silu(w2(x)))
    }
    for i in range(config["num_hidden_layers"]):
        ours, theirs = f"model.layers.{i}.", LLM_BLOCK.format(i=i)
        llm += [rename(f"{theirs}{a}.weight", f"{ours}{b}.weight") for a, b in llm_renames.items()]
        for kind in ("weight", "bias"):
            llm.append(Rule((f"{theirs}attn.c_attn.{kind}",), tuple(f"{ours}self_attn.{p}_proj.{kind}" for p in "qkv"),
                            _split_qkv, _join_qkv))
    return Layout(vision, adapter, llm)


def _apply(rules: list[Rule], state: dict[str, torch.Tensor], forward: bool, what: str) -> dict[str, torch.Tensor]:
    """Map ``state`` through ``rules`` (Qwen-VL -> ours when ``forward``); every source tensor must be there."""
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for rule in rules:
        sources, targets, fn = (rule.original, rule.ours, rule.to_ours) if forward else (rule.ours, rule.original, rule.to_original)
        absent = [name for name in sources if name not in state]
        if absent:
            missing += absent
            continue
        out.update(zip(targets, fn([state[name] for name in sources])))
    if missing:
        raise ConversionError(f"{what}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    return out


def to_ours(state: dict[str, torch.Tensor], config: dict[str, Any], source: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
    """Qwen-VL's state dict -> ``{"vision": timm names, "adapter": resampler names, "llm": Qwen2 names}``.

    Every tensor must be there with the shape ``config`` gives it, and nothing else: a mismatch is a
    :class:`ConversionError` naming the tensors.
    """
    shapes = original_shapes(config)
    state = {k: v for k, v in state.items() if not k.endswith(("attn.masked_bias", "rotary_emb.inv_freq"))}  # buffers
    wrong = [f"{k}: {tuple(v.shape)}, expected {shapes[k]}" for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    unexpected = sorted(set(state) - set(shapes))
    if wrong or unexpected:
        raise ConversionError(f"{source} does not match its config.json: shapes {wrong[:5]}, unexpected tensors {unexpected[:5]}")
    return {name: _apply(rules, state, True, source) for name, rules in layout(config).components().items()}


def to_original(parts: dict[str, dict[str, torch.Tensor]], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_ours`: our three state dicts -> Qwen-VL's state dict."""
    state: dict[str, torch.Tensor] = {}
    for name, rules in layout(config).components().items():
        unexpected = sorted(set(parts[name]) - {source for rule in rules for source in rule.ours})
        if unexpected:
            raise ConversionError(f"our {name} has tensors Qwen-VL's layout has no place for: {unexpected[:5]}")
        state.update(_apply(rules, parts[name], False, f"our {name}"))
    return state


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
        return ("; it looks like from-qwen-vl's output (already converted): use it as model.llm.pretrained over "
                "configs/models/presets/qwen_vl_chat.yaml")
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


def qwen2_config(config: dict[str, Any], dtype: torch.dtype):
    """The Qwen2 transformers config of a Qwen-1 LLM (no logn / dynamic NTK: see the README)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"] // 2,  # Qwen-1 counts w1 and w2 together
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_attention_heads"],
        max_position_embeddings=config["max_position_embeddings"],
        initializer_range=config.get("initializer_range", 0.02),
        rms_norm_eps=config["layer_norm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(config["rotary_emb_base"])},
        attention_dropout=config.get("attn_dropout_prob", 0.0),
        tie_word_embeddings=False,
        eos_token_id=RELEASE_GENERATION_CONFIG["eos_token_id"],
        architectures=["Qwen2ForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )


def save_weights(state: dict[str, torch.Tensor], out: Path) -> None:
    """``model.safetensors``, or shards of 5 GB and their ``model.safetensors.index.json`` (what both
    transformers and Qwen-VL's code read)."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, out, max_shard_size="5GB")


def from_qwen_vl(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert the Qwen-VL release at ``src`` into ``out`` (see the module docstring); ``overwrite``:
    a non-empty ``out`` is moved aside first."""
    from lavis.interop.export import check_output, staged_output

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
    log.info("converted %s to %s: use configs/models/presets/qwen_vl_chat.yaml with model.llm.pretrained=%s", src, out, out)
    return out


# --------------------------------------------------------------------------- to-qwen-vl


def own_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A component's state dict by canonical names (no activation-checkpoint wrapper prefixes)."""
    from lavis.models.vlm import canonical_name

    return {canonical_name(k): v for k, v in module.state_dict().items()}


def mlp_ratio(width: int, hidden: int) -> float:
    """A ratio that visual.py's ``int(width * mlp_ratio)`` turns back into ``hidden``."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def qwen_vl_config(model, image_start_id: int) -> dict[str, Any]:
    """Qwen-VL's config.json for a model built here (``RELEASE_CONFIG`` for what the model does not say)."""
    from lavis.models.adapters.qwen_resampler import QwenResampler
    from lavis.models.vision.timm_vit import TimmViT

    vision, adapter, llm = model.vision, model.adapter, model.llm
    vit = vision.model if isinstance(vision, TimmViT) else None
    problems = []
    if vit is None or not isinstance(adapter, QwenResampler):
        problems.append("Qwen-VL's layout needs a timm_vit vision encoder and a qwen_resampler adapter")
    else:
        if vit.num_prefix_tokens or not isinstance(vit.norm, torch.nn.Identity) or getattr(vit.norm_pre, "eps", None) != 1e-6:
            problems.append("the ViT must have no class token, a pre-norm (pre_norm: true), no final norm (final_norm: false) "
                            "and LayerNorm eps 1e-6")
        if vit.pos_embed.shape[1] != POS_TABLE_ROWS:
            problems.append(f"Qwen-VL's ViT has a {POS_TABLE_ROWS}-row position table (timm_vit.pos_embed_grid: 16), "
                            f"this one has {vit.pos_embed.shape[1]}")
        if adapter.num_queries != IMAGE_TOKENS or adapter.num_heads != adapter.embed_dim // 128:
            problems.append(f"Qwen-VL's resampler has {IMAGE_TOKENS} queries and hidden // 128 heads")
    hf = llm.config
    if hf.model_type != "qwen2" or hf.num_key_value_heads != hf.num_attention_heads:
        problems.append("the LLM must be a Qwen2 without grouped-query attention (Qwen-1 has none)")
    if problems:
        raise ConversionError("; ".join(problems))
    width = vision.width
    dtype = llm.get_input_embeddings().weight.dtype
    sizes = {
        "hidden_size": hf.hidden_size,
        "intermediate_size": 2 * hf.intermediate_size,
        "kv_channels": hf.hidden_size // hf.num_attention_heads,
        "layer_norm_epsilon": hf.rms_norm_eps,
        "max_position_embeddings": hf.max_position_embeddings,
        "num_attention_heads": hf.num_attention_heads,
        "num_hidden_layers": hf.num_hidden_layers,
        "rotary_emb_base": hf.rope_parameters["rope_theta"],
        "vocab_size": llm.get_input_embeddings().num_embeddings,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "fp32": dtype == torch.float32,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "visual": {
            "heads": vit.blocks[0].attn.num_heads,
            "image_size": vision.image_size,
            "image_start_id": image_start_id,
            "layers": vision.num_layers,
            "mlp_ratio": mlp_ratio(width, vit.blocks[0].mlp.fc1.out_features),
            "output_dim": hf.hidden_size,
            "patch_size": vision.patch_size[0],
            "width": width,
        },
    }
    rotary_base = sizes["rotary_emb_base"]
    sizes["rotary_emb_base"] = int(rotary_base) if float(rotary_base).is_integer() else rotary_base
    return dict(sorted({**RELEASE_CONFIG, **sizes}.items()))


def to_qwen_vl(run: str | Path, out: str | Path, code_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a model trained here (``run``: as :func:`lavis.load_model` takes it) in Qwen-VL's layout;
    ``overwrite``: a non-empty ``out`` is moved aside first."""
    from lavis.interop.export import check_output, model_inputs, staged_output

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
    from lavis.common.config import load_config
    from lavis.models.loading import load_model
    from lavis.models import config_of, resolve_weights_path

    config_file = config_of(resolve_weights_path(str(run)))
    if config_file is None:
        hint = what_it_is(Path(run)) if Path(run).is_dir() else ""
        raise ConversionError(f"{run}: no config.yaml in the checkpoint or its run{hint}; expected a model trained "
                              "here (a run's output_dir, a checkpoint directory or an export)")
    cfg = load_config(config_file)
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


# --------------------------------------------------------------------------- command line

OVERWRITE_HELP = ("write into a non-empty OUT, its content moved aside to OUT.old-<time> first (never deleted); "
                  "the input and a training run's directory are refused whatever this says")


def main(argv: list[str] | None = None) -> int:
    from lavis.tracking.logging import setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inward = commands.add_parser("from-qwen-vl", help="a Qwen-VL release -> timm ViT, resampler, Qwen2 LLM")
    inward.add_argument("src", help="local copy of Qwen-VL or Qwen-VL-Chat (config.json, weights, qwen.tiktoken)")
    inward.add_argument("out", help="directory to write (the LLM directory, holding the other files too)")
    inward.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    outward = commands.add_parser("to-qwen-vl", help="a model trained here -> Qwen-VL's layout")
    outward.add_argument("run", help="a run's output_dir, a checkpoint directory or an exported model")
    outward.add_argument("out", help="directory to write")
    outward.add_argument("--code-from", default=None, help="a local Qwen-VL release whose Python files to copy into OUT")
    outward.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.command == "from-qwen-vl":
            from_qwen_vl(args.src, args.out, args.overwrite)
        else:
            to_qwen_vl(args.run, args.out, args.code_from, args.overwrite)
    except (ValueError, OSError) as err:  # ConversionError, a refused OUT, a missing or unreadable file
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
