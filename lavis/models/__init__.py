"""Models: the composite VLM and its registered components; :func:`build_model` assembles them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from lavis.common.registry import registry
from lavis.models import adapters, llm, vision  # noqa: F401  (register the components)
from lavis.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


@dataclass
class Processors:
    """What turns raw inputs into model inputs: the tokenizer and the image transform."""

    tokenizer: object
    image: object


def build_component(kind: str, component, **context):
    """Instantiate a registered component from its :class:`ComponentConfig`."""
    return registry.get(kind, component.type)(**component.params, **context)


def build_model(cfg) -> tuple[VisionLanguageModel, Processors]:
    """Build the VLM and its processors from a :class:`~lavis.common.config.ModelConfig`."""
    tokenizer = build_component("processor", cfg.tokenizer)
    vision = build_component("vision_encoder", cfg.vision)
    language_model = build_component("llm", cfg.llm)
    hidden = language_model.get_input_embeddings().embedding_dim
    adapter = build_component("adapter", cfg.adapter, vision_width=vision.width, llm_hidden_size=hidden)
    vocab = language_model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        new_size = int(math.ceil(len(tokenizer) / 64) * 64)
        log.info("resizing the LLM vocabulary from %d to %d for the tokenizer's special tokens", vocab, new_size)
        language_model.resize_token_embeddings(new_size, mean_resizing=False)
    arch = registry.get("model", cfg.arch)
    model = arch(vision, adapter, language_model, image_pad_id=tokenizer.img_pad_id, image_size=vision.image_size)
    model.apply_freeze({"vision": cfg.freeze.vision, "adapter": cfg.freeze.adapter, "llm": cfg.freeze.llm})
    image_processor = build_component("processor", cfg.image_processor)
    if image_processor.image_size != vision.image_size:
        raise ValueError(
            f"model.image_processor.image_size ({image_processor.image_size}) != model.vision.image_size ({vision.image_size})"
        )
    return model, Processors(tokenizer=tokenizer, image=image_processor)
