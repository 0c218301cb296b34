"""LLM: any transformers causal LM, from a local directory or an inline config."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lavis.common.registry import registry

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@registry.register("llm", "hf_causal_lm")
def hf_causal_lm(
    pretrained: str | None = None,
    config: dict | None = None,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """A ``transformers`` causal LM.

    Exactly one of ``pretrained`` (a local model directory; nothing is downloaded) and ``config``
    (an inline transformers config with ``model_type``, randomly initialised) must be set.
    ``attn_implementation``: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
    """
    if (pretrained is None) == (config is None):
        raise ValueError("model.llm: set exactly one of 'pretrained' (a local directory) and 'config' (inline)")
    if dtype not in _DTYPES:
        raise ValueError(f"model.llm.dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    if pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(
            pretrained,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            dtype=_DTYPES[dtype],
        )
    else:
        config = dict(config)
        if "model_type" not in config:
            raise ValueError("model.llm.config needs a 'model_type' (e.g. qwen2)")
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
        model = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, dtype=_DTYPES[dtype]
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
