"""Batched text generation for the VLM: left-padded prompts, images injected once at prefill.

The prompt's embeddings (token embeddings with the image vectors at the ``<imgpad>`` positions) are
built once with :meth:`VisionLanguageModel.embed_inputs` and handed to the Hugging Face LLM's own
``generate(inputs_embeds=...)``, which runs the prefill on them and then continues from token ids
with the KV cache. Greedy, beam search and (temperature / nucleus) sampling come from ``transformers``.

Position ids under left padding: each row's positions are ``cumsum(attention_mask) - 1`` (pads at 0),
so a padded prompt sees exactly the positions it would see alone; decode steps continue from each
row's last position. transformers (5.x) derives the same ids itself when none are given; they are
passed explicitly here so that this does not depend on the library version or the LLM class. An
M-RoPE LLM gets the prompt's 3-D positions (:meth:`VisionLanguageModel.llm_position_ids`) and
continues each row from its largest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lavis.models.positions import position_ids_from_mask


def left_pad(samples: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids [B, L], attention_mask [B, L]), padded on the left for generation."""
    if not samples:
        raise ValueError("left_pad needs at least one sample")
    length = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, sample in enumerate(samples):
        if len(sample) == 0:
            raise ValueError(f"sample {i} is empty; a prompt needs at least one token")
        input_ids[i, length - len(sample) :] = torch.as_tensor(list(sample), dtype=torch.long)
        attention_mask[i, length - len(sample) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int | None = None,
    suppress_ids: Sequence[int] = (),
    synced: bool = False,
    min_new_tokens: int = 0,
    streamer: Any = None,
    stopping_criteria: Any = None,
) -> torch.Tensor:
    """New tokens [B, T] (T <= ``max_new_tokens``) for left-padded prompts; rows that stopped are padded.

    ``model``: a :class:`~lavis.models.vlm.VisionLanguageModel`. ``pixel_values``: all images of the
    batch, in row order then text order (as the collator stacks them). ``stop_ids``: generation of a
    row ends after it emits one of these (kept in the output); later positions hold ``pad_id``.
    ``suppress_ids``: tokens never generated (chat and evaluation pass the image-span tokens).
    ``min_new_tokens``: the stop ids cannot end a row before this many tokens (Qwen-VL's evaluation sets it per task).
    ``synced``: every rank keeps stepping until all ranks are done (sharded parameters: each decoding
    step gathers them, so the ranks must take the same number of steps).
    ``streamer`` (a transformers ``BaseStreamer``: each step's new tokens [B]) and ``stopping_criteria``
    (a ``StoppingCriteriaList``) go to the LLM's ``generate`` (serving: :mod:`lavis.serving`).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded (the last position of every row must be attended); see left_pad")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    stop_ids = [int(i) for i in stop_ids]
    if pad_id is None:
        pad_id = stop_ids[0] if stop_ids else 0

    was_training = model.training
    model.eval()
    try:
        device = model.llm.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        embeds = model.embed_inputs(input_ids, pixel_values)  # the images enter here, once
        options = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "num_beams": num_beams,
            "num_return_sequences": 1,
            "do_sample": do_sample,
            "eos_token_id": stop_ids or None,
            "pad_token_id": pad_id,
            "use_cache": True,
            "synced_gpus": synced,
        }
        if streamer is not None:
            options["streamer"] = streamer
        if stopping_criteria is not None:
            options["stopping_criteria"] = stopping_criteria
        if suppress_ids:
            options["suppress_tokens"] = [int(i) for i in suppress_ids]
        if do_sample:
            options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        if num_beams > 1:
            options.update(early_stopping=True, length_penalty=1.0)
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=model.llm_position_ids(input_ids, attention_mask, position_ids_from_mask(attention_mask), pixel_values),
            **options,
        )
    finally:
        model.train(was_training)
    # With inputs_embeds only, transformers returns the new tokens alone; keep that robust anyway.
    if out.shape[1] > max_new_tokens:
        out = out[:, -max_new_tokens:]
    return pad_after_stop(out, stop_ids, pad_id)


def pad_after_stop(tokens: torch.Tensor, stop_ids: Sequence[int], pad_id: int) -> torch.Tensor:
    """Replace everything after each row's first stop id with ``pad_id`` (the stop id itself is kept)."""
    if not stop_ids or tokens.numel() == 0:
        return tokens
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device))
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # positions strictly after the first stop
    return tokens.masked_fill(after, pad_id)


def until_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The generated tokens before the first stop id (the text of an answer)."""
    stops = set(stop_ids)
    return list(next((tokens[:k] for k, t in enumerate(tokens) if t in stops), tokens))
