"""LLM: the Qwen2-VL / Qwen2.5-VL language model alone (M-RoPE: 3-D positions), from a local checkpoint or an inline config.

The decoder is transformers' own ``Qwen2VLTextModel`` / ``Qwen2_5_VLTextModel``; :class:`MRopeCausalLM` adds the
LM head and the causal-LM interface the framework uses (``get_decoder``, ``generate``, ...). Parameter names are
those of ``Qwen2ForCausalLM`` (``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``,
``lm_head.weight``). The vision tower of a Qwen2-VL checkpoint is not part of it: its weights are skipped.

Positions: ``[3, B, L]`` (temporal, height, width), or ``[B, L]`` for text only (the same on the three axes).
In ``generate`` every decode step sits, on the three axes, one past the row's largest prompt position, then one
further per step (transformers' Qwen2-VL ``rope_deltas``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig, Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from lavis.common.registry import registry
from lavis.models.hf_checkpoint import load_into
from lavis.models.positions import position_ids_from_mask

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys of a saved config that describe the saved object, not the architecture.
# What a checkpoint's weights fix: the inline config may repeat these, never change them (the default YAML's
# inline config is Qwen2-VL-2B's, merged under a project's `pretrained`).
_FIXED_BY_WEIGHTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                     "vocab_size", "tie_word_embeddings")
_NOT_ARCHITECTURE = {"model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "text_config"}


class MRopeCausalLM(PreTrainedModel, GenerationMixin):
    """A Qwen2-VL-family text model (M-RoPE) with an LM head: a ``transformers`` causal LM taking 3-D positions.

    Subclasses fix the family (:class:`Qwen2VLCausalLM`, :class:`Qwen2_5_VLCausalLM`).
    """

    text_model_class: type[PreTrainedModel]
    base_model_prefix = "model"
    position_dims = 3  # the composite model hands this LM [3, B, L] positions
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__(config)
        self.model = self.text_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def mrope_section(self) -> list[int]:
        """How the rotary frequencies are split over (temporal, height, width): ``sum == head_dim // 2``."""
        return list(self.config.rope_parameters["mrope_section"])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> PreTrainedModel:
        """The text model: ``(inputs_embeds, attention_mask, position_ids, ...) -> last_hidden_state``."""
        return self.model

    def set_decoder(self, decoder: PreTrainedModel) -> None:
        self.model = decoder

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the cache with ``use_cache``). ``position_ids``: ``[3, B, L]``, or ``[B, L]`` for text only;
        without them, each row counts its attended tokens (``cumsum(attention_mask) - 1``), as ``generate`` does."""
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            position_ids = position_ids_from_mask(attention_mask)[:, -length:]
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _update_model_kwargs_for_generation(
        self, outputs: Any, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict[str, Any]:
        # GenerationMixin (5.x) extends `position_ids` by the last column + 1 on each axis on its own; after an image
        # the axes differ there. Qwen2-VL continues from the row's largest position (its rope_deltas), on all axes.
        positions = model_kwargs.get("position_ids")
        mask = model_kwargs.get("attention_mask")
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)
        if positions is not None and not is_encoder_decoder and (positions.ndim == 2 or positions.shape[0] == 3):
            model_kwargs["position_ids"] = extend_positions(positions, mask, num_new_tokens)
        return model_kwargs


class Qwen2VLCausalLM(MRopeCausalLM):
    """Qwen2-VL's language model (``model_type: qwen2_vl``)."""

    config_class = Qwen2VLTextConfig
    text_model_class = Qwen2VLTextModel
    _no_split_modules = ["Qwen2VLDecoderLayer"]


class Qwen2_5_VLCausalLM(MRopeCausalLM):  # transformers' spelling of the family
    """Qwen2.5-VL's language model (``model_type: qwen2_5_vl``)."""

    config_class = Qwen2_5_VLTextConfig
    text_model_class = Qwen2_5_VLTextModel
    _no_split_modules = ["Qwen2_5_VLDecoderLayer"]


# model_type (composite or text) -> (composite config class, model class)
FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[MRopeCausalLM]]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLCausalLM),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLCausalLM),
}


def extend_positions(positions: torch.Tensor, attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
    """``positions`` ([3, B, L] or [B, L]) followed by ``num_new`` columns: the row's largest attended position
    (over all axes) + 1, + 2, ..., the same on every axis."""
    grid = positions if positions.ndim == 3 else positions.unsqueeze(0)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and attention_mask.shape[-1] == grid.shape[-1]:
        grid = grid.masked_fill(attention_mask.unsqueeze(0) == 0, torch.iinfo(grid.dtype).min)
    last = grid.amax(dim=(0, 2))  # [B]
    steps = torch.arange(1, num_new + 1, dtype=positions.dtype, device=positions.device)
    new = last[:, None] + steps[None, :]  # [B, num_new]
    if positions.ndim == 3:
        new = new.unsqueeze(0).expand(positions.shape[0], -1, -1)
    return torch.cat([positions, new], dim=-1)


def _family(model_type: str | None, key: str) -> str:
    family = (model_type or "").removesuffix("_text")
    if family not in FAMILIES:
        names = ", ".join(f"{f} (or {f}_text)" for f in FAMILIES)
        raise ValueError(
            f"{key} must be one of {names}, got '{model_type}'; for another causal LM use model.llm.type: hf_causal_lm"
        )
    return family


def _rope(fields: dict[str, Any]) -> dict[str, Any]:
    """Pop the rotary settings out of ``fields`` (``rope_parameters``, legacy ``rope_scaling``, ``rope_theta``,
    ``mrope_section``) into one ``rope_parameters`` dict (M-RoPE is the ``default`` rope type over 3 axes)."""
    rope = dict(fields.pop("rope_scaling", None) or {})
    rope.update(fields.pop("rope_parameters", None) or {})
    for name in ("rope_theta", "mrope_section"):
        if name in fields:
            rope[name] = fields.pop(name)
    if rope.pop("type", None) == "mrope" or rope.get("rope_type") == "mrope":
        rope["rope_type"] = "default"
    return rope


def text_config(
    family: str, base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, tie_word_embeddings: bool = False
) -> PreTrainedConfig:
    """The family's text config from ``base`` (a saved text config's fields) updated by ``overrides`` (the YAML's)."""
    base, overrides = dict(base or {}), dict(overrides or {})
    base.pop("layer_types", None)  # derived again from the (possibly overridden) depth and sliding-window settings
    rope = {"rope_type": "default", **_rope(base), **_rope(overrides)}
    fields = {k: v for k, v in {**base, **overrides}.items() if k not in _NOT_ARCHITECTURE}
    tie = bool(fields.pop("tie_word_embeddings", tie_word_embeddings))
    config_cls = FAMILIES[family][1].config_class
    config = config_cls(rope_parameters=rope, **fields)
    config.tie_word_embeddings = tie  # the text configs have no such field; the model reads it from its own config
    head_dim = config.hidden_size // config.num_attention_heads
    section = config.rope_parameters.get("mrope_section")
    if section is None or len(section) != 3 or 2 * sum(section) != head_dim:
        raise ValueError(
            f"model.llm.config.rope_parameters.mrope_section must be 3 numbers summing to head_dim / 2 = {head_dim // 2} "
            f"(hidden_size / num_attention_heads / 2), got {section}"
        )
    return config


def _read_checkpoint_config(directory: Path) -> tuple[str, dict[str, Any], bool]:
    """(family, text-config fields, tie_word_embeddings) of a Qwen2-VL checkpoint directory's config.json."""
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"model.llm.pretrained: no config.json in '{directory}' (a local Qwen2-VL / Qwen2.5-VL checkpoint directory)")
    saved = json.loads(path.read_text())
    family = _family(saved.get("model_type"), f"model.llm.pretrained: the model_type of {path}")
    # The composite config sorts out both layouts: a text_config (transformers 5) or text fields at the top level.
    composite = FAMILIES[family][0].from_dict({k: v for k, v in saved.items() if k not in ("architectures", "transformers_version")})
    tie = bool(saved.get("tie_word_embeddings", saved.get("text_config", {}).get("tie_word_embeddings", False)))
    return family, composite.text_config.to_dict(), tie


def language_model_key(key: str) -> str | None:
    """A checkpoint key under our names, or None for the rest (the vision tower):
    ``model.language_model.X`` (transformers 5) and ``model.X`` (released) -> ``model.X``; ``lm_head.*`` kept."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("lm_head.") or (key.startswith("model.") and not key.startswith("model.visual.")):
        return key
    return None


def load_language_model(model: MRopeCausalLM, directory: Path) -> None:
    """Copy the language-model and LM-head weights of a checkpoint directory into ``model`` (either key layout)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # a tied lm_head.weight is one parameter with model.embed_tokens.weight: read the embeddings only
    load_into(model, directory, lambda key: None if tied and key == "lm_head.weight" else language_model_key(key),
              "model.llm.pretrained", optional={"lm_head.weight"} if tied else set())


@registry.register("llm", "qwen2_vl_lm")
def qwen2_vl_lm(
    pretrained: str | None = None,
    config: dict | None = None,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> MRopeCausalLM:
    """The Qwen2-VL / Qwen2.5-VL language model (M-RoPE) and its LM head; nothing is downloaded.

    ``pretrained``: a local Qwen2-VL / Qwen2.5-VL checkpoint directory (its text config and its language-model
    and LM-head weights; the vision tower is skipped). ``config``: an inline text config with ``model_type``
    (qwen2_vl or qwen2_5_vl) — the architecture of a randomly initialised model when ``pretrained`` is null,
    otherwise overrides of the directory's. Under ``torch.device("meta")`` no weights are read, and a directory
    not on this machine falls back to the inline config.
    """
    if pretrained is None and config is None:
        raise ValueError("model.llm: set 'pretrained' (a local Qwen2-VL checkpoint directory) or 'config' (inline), or both")
    if dtype not in _DTYPES:
        raise ValueError(f"model.llm.dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    overrides = dict(config or {})
    model_type = overrides.pop("model_type", None)
    on_meta = torch.get_default_device().type == "meta"
    directory = Path(pretrained) if pretrained is not None else None
    if directory is not None and not directory.is_dir() and not on_meta:
        raise ValueError(f"model.llm.pretrained: '{pretrained}' is not a local directory (nothing is downloaded)")
    use_directory = directory is not None and (not on_meta or (directory / "config.json").exists())
    if use_directory:
        family, base, tie = _read_checkpoint_config(directory)
        if model_type is not None and _family(model_type, "model.llm.config.model_type") != family:
            raise ValueError(
                f"model.llm.config.model_type '{model_type}' contradicts the '{family}' checkpoint in model.llm.pretrained; "
                "set model.llm.config: null to take the checkpoint's config (or give only the keys to override)"
            )
        saved = {**base, "tie_word_embeddings": tie}
        for key in _FIXED_BY_WEIGHTS:
            if key in overrides and overrides[key] != saved.get(key):
                raise ValueError(
                    f"model.llm.config.{key}: {overrides[key]} contradicts the checkpoint's {saved.get(key)} in model.llm.pretrained "
                    "(its weights fix it); set model.llm.config: null to take the checkpoint's config (or give only the keys to override)"
                )
    else:
        if model_type is None:
            raise ValueError("model.llm.config needs a 'model_type' (qwen2_vl or qwen2_5_vl) to build a model without weights")
        family, base, tie = _family(model_type, "model.llm.config.model_type"), {}, False
    hf_config = text_config(family, base, overrides, tie_word_embeddings=tie)
    model_cls = FAMILIES[family][1]
    options = {"attn_implementation": attn_implementation, "dtype": _DTYPES[dtype]}
    if use_directory and not on_meta:
        with no_init_weights():  # every weight is overwritten by the checkpoint's
            model = model_cls._from_config(hf_config, **options)
        model.tie_weights()
        load_language_model(model, directory)
    else:
        model = model_cls._from_config(hf_config, **options)
    # Applied per decoder layer by the composite model (VisionLanguageModel.apply_activation_checkpointing).
    model.activation_checkpointing = gradient_checkpointing
    return model
