"""LLM: any transformers causal LM, from a local directory or an inline config."""

from __future__ import annotations

from pathlib import Path

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
    """A ``transformers`` causal LM; nothing is downloaded.

    ``pretrained``: a local model directory. ``config``: an inline transformers config with
    ``model_type`` — the architecture of a randomly initialised model when ``pretrained`` is null,
    otherwise overrides of the directory's ``config.json`` (e.g. ``attention_dropout``). Under
    ``torch.device("meta")`` no weights are read: the directory's config, or the inline one when the
    directory is not on this machine, gives the shapes.
    """
    if pretrained is None and config is None:
        raise ValueError("model.llm: set 'pretrained' (a local directory) or 'config' (inline), or both")
    if dtype not in _DTYPES:
        raise ValueError(f"model.llm.dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    config = dict(config or {})
    model_type = config.pop("model_type", None)
    options = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code, "dtype": _DTYPES[dtype]}
    on_meta = torch.get_default_device().type == "meta"
    if pretrained is not None and not (on_meta and not Path(pretrained, "config.json").exists()):
        if on_meta:
            hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **config)
            model = AutoModelForCausalLM.from_config(hf_config, **options)
        else:
            model = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True, **options, **config)
    else:
        if model_type is None:
            raise ValueError("model.llm.config needs a 'model_type' (e.g. qwen2) to build a model without weights")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), **options)
    # Applied per decoder layer by the composite model (VisionLanguageModel.apply_activation_checkpointing).
    model.activation_checkpointing = gradient_checkpointing
    return model
