"""Qwen-VL's layout rules: its tensor names and shapes, how each maps onto ours (renames, reshapes,
splits) and back, and the translation of its config.json to and from our models' configs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

IMAGE_TOKENS = 256  # Qwen-VL's tokenizer pads every <img>...</img> span to 256 tokens
POS_TABLE_ROWS = 256  # Qwen-VL's ViT builds a 16x16 position table whatever its image size
VISUAL = "transformer.visual."
VIT_BLOCK = VISUAL + "transformer.resblocks.{i}."
LLM_BLOCK = "transformer.h.{i}."

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
    pool = VISUAL + "attn_pool."
    adapter = [rename(name, name[len(pool):]) for name in original_shapes(config) if name.startswith(pool)]
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



# --------------------------------------------------------------------------- config translation


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

