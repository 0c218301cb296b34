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
    video: object | None = None


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
    model = arch(vision, adapter, language_model, image_pad_id=image_pad_id, image_size=getattr(vision, "image_size", None))
    model.video_pad_id = tokenizer.vid_pad_id if tokenizer is not None else image_pad_id
    image_processor = build_component("processor", cfg.image_processor)
    video_processor = None if cfg.video_processor is None else build_component("processor", cfg.video_processor)
    check_components(cfg, model, image_processor, video_processor)
    if cfg.load_from and not meta:
        load_stage_checkpoint(model, cfg.load_from)
    policies = {name: build_component("freeze_policy", getattr(cfg.freeze, name)) for name in model.COMPONENTS}
    model.apply_freeze(policies, meta=meta)
    model.apply_activation_checkpointing()
    return model, Processors(tokenizer=tokenizer, image=image_processor, video=video_processor)


def check_components(cfg, model: VisionLanguageModel, image_processor, video_processor=None) -> None:
    """The components fit together: the image processor gives what the vision encoder takes (a fixed
    size, or native-resolution patches of its patch and merge sizes), and an M-RoPE LLM gets image
    tokens on a grid. Each mismatch is a ValueError naming both keys, before anything runs."""
    encoder, adapter = model.vision, model.adapter
    native = model.native_resolution
    if native != bool(getattr(image_processor, "native_resolution", False)):
        wants = "native-resolution patches (e.g. qwen2_vl_image)" if native else "fixed-size images (e.g. clip_image)"
        raise ValueError(f"model.vision ({cfg.vision.type}) takes {wants}; model.image_processor is {cfg.image_processor.type}")
    if native:
        for section, processor in (("image_processor", image_processor), ("video_processor", video_processor)):
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if processor is not None and hasattr(processor, key) and getattr(processor, key) != getattr(encoder, key):
                    raise ValueError(f"model.{section}.{key} ({getattr(processor, key)}) != the vision encoder's "
                                     f"({getattr(encoder, key)}, model.vision.config)")
        if getattr(adapter, "takes_windows", False) and adapter.merge_size != encoder.merge_size:
            raise ValueError(f"model.adapter.merge_size ({adapter.merge_size}) != the vision encoder's spatial_merge_size "
                             f"({encoder.merge_size}): the processor orders patches in windows of the latter")
        sample_grid = (1, 2 * encoder.merge_size, 2 * encoder.merge_size)
    else:
        if image_processor.image_size != encoder.image_size:
            raise ValueError(f"model.image_processor.image_size ({image_processor.image_size}) != model.vision.image_size "
                             f"({encoder.image_size})")
        sample_grid = encoder.grid
    if model.position_dims == 3 and adapter.token_grid(sample_grid) is None:
        raise ValueError(f"model.llm ({cfg.llm.type}) takes 3-D (M-RoPE) positions, and model.adapter ({cfg.adapter.type}) "
                         "gives its image tokens none (they are not a grid of the image): use an adapter that keeps the "
                         "grid (patch_merger, mlp) or a 1-D LLM (hf_causal_lm)")
