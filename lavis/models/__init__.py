"""Models: the composite VLM and its registered components; :func:`build_model` assembles them
(weights on disk: :mod:`.weights`; a trained run's model: :mod:`.loading`; chat: :mod:`.chat`).
May import :mod:`lavis.tracking`, :mod:`lavis.processors` and :mod:`lavis.common` only (never datasets).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from lavis.common.registry import registry
from lavis.models import adapters, freeze, llm, vision  # noqa: F401  (register the components)
from lavis.models.vlm import VisionLanguageModel
from lavis.models.weights import load_stage_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Processors:
    """What turns raw inputs into model inputs: the tokenizer and the image transform."""

    tokenizer: object
    image: object


def build_component(kind: str, component, **context):
    """Instantiate a registered component from its :class:`ComponentConfig`."""
    return registry.get(kind, component.type)(**component.params, **context)


def build_model(cfg, meta: bool = False) -> tuple[VisionLanguageModel, Processors]:
    """Build the VLM and its processors from a :class:`~lavis.common.config.ModelConfig`.

    ``meta``: build on the meta device — shapes only, no weights read, no memory — to count the
    parameters of a full-scale config on any machine. ``load_from`` is not applied then.
    """
    try:
        tokenizer = build_component("processor", cfg.tokenizer)
    except (OSError, ValueError) as err:
        if not meta:
            raise
        log.warning("tokenizer not loaded (%s); counting parameters without it", err)
        tokenizer = None
    with torch.device("meta") if meta else contextlib.nullcontext():
        vision = build_component("vision_encoder", cfg.vision)
        language_model = build_component("llm", cfg.llm)
        hidden = language_model.get_input_embeddings().embedding_dim
        adapter = build_component("adapter", cfg.adapter, vision_width=vision.width, llm_hidden_size=hidden)
    vocab = language_model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > vocab:
        new_size = int(math.ceil(len(tokenizer) / 64) * 64)
        log.info("resizing the LLM vocabulary from %d to %d for the tokenizer's special tokens", vocab, new_size)
        language_model.resize_token_embeddings(new_size, mean_resizing=False)
    arch = registry.get("model", cfg.arch)
    image_pad_id = tokenizer.img_pad_id if tokenizer is not None else -1
    model = arch(vision, adapter, language_model, image_pad_id=image_pad_id, image_size=vision.image_size)
    if cfg.load_from and not meta:
        load_stage_checkpoint(model, cfg.load_from)
    policies = {name: build_component("freeze_policy", getattr(cfg.freeze, name)) for name in model.COMPONENTS}
    model.apply_freeze(policies, meta=meta)
    model.apply_activation_checkpointing()
    image_processor = build_component("processor", cfg.image_processor)
    if image_processor.image_size != vision.image_size:
        raise ValueError(
            f"model.image_processor.image_size ({image_processor.image_size}) != model.vision.image_size ({vision.image_size})"
        )
    return model, Processors(tokenizer=tokenizer, image=image_processor)
