"""The composite VLM: visual encoder -> adapter -> image vectors scattered into the LLM's embeddings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lavis.common.registry import registry
from lavis.models.adapters.grids import windows_to_rows
from lavis.models.freeze import FreezePolicy, Trainable, format_parameter_counts, merge_lora_state, parameter_counts
from lavis.models.positions import mrope_position_ids, position_ids_from_mask
from lavis.processors.conversation import IGNORE_INDEX
from lavis.processors.native_image import PatchImages, num_images

log = logging.getLogger(__name__)


def component_blocks(component: nn.Module) -> list[nn.Module]:
    """A component's repeated blocks, as they sit in the model (activation-checkpoint wrappers included).

    The component's own ``blocks()`` when it has one (the timm ViT); for a transformers model the
    modules of the classes its ``_no_split_modules`` names (the decoder layers); else the component.
    """
    if callable(getattr(component, "blocks", None)):
        return component.blocks()
    names = set(getattr(component, "_no_split_modules", None) or ())
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            inner = getattr(child, "_checkpoint_wrapped_module", child)
            if type(inner).__name__ in names:
                found.append(child)
            else:
                visit(child)

    if names:
        visit(component)
    return found or [component]


WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """A parameter's name without the prefixes wrappers add (activation checkpointing, compile)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


@dataclass
class LMLoss:
    """Summed cross-entropy over the supervised tokens, and their count."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor


@dataclass
class TokenLosses:
    """Cross-entropy of each supervised next token (``losses [n]``, row by row) and where they are
    (``selected [B, L-1]``)."""

    losses: torch.Tensor
    selected: torch.Tensor


@registry.register("model", "qwen_vl")
class VisionLanguageModel(nn.Module):
    """Qwen-VL's architecture: every ``<imgpad>`` run in the text receives one image's adapter outputs.

    Works with any registered vision encoder, adapter and causal LM; any number of images per
    sample, anywhere in the text. Images come at a fixed size (``pixel_values`` ``[n, 3, H, W]``, the
    same number of tokens each) or at native resolution (a native vision encoder such as
    ``qwen2_vl_vit``: :class:`~lavis.processors.native_image.PatchImages`, each image its own number of
    tokens). An LLM with ``position_dims = 3`` (M-RoPE, ``qwen2_vl_lm``) gets 3-D position ids.
    """

    COMPONENTS = ("vision", "adapter", "llm")

    def __init__(self, vision: nn.Module, adapter: nn.Module, llm: nn.Module, image_pad_id: int,
                 image_size: int | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.adapter = adapter
        self.llm = llm
        self.image_pad_id = image_pad_id
        self.video_pad_id = image_pad_id  # a tokenizer's own video pad: set by build_model
        self.image_size = image_size
        self.freeze_policies: dict[str, FreezePolicy] = {name: Trainable() for name in self.COMPONENTS}
        # Run the visual path in every forward, with or without images (set by sharding strategies).
        self.vision_every_step = False
        # Set by attach_processors (lavis.load_model does it) for chat().
        self.processors = None
        self.system_message = "You are a helpful assistant."

    @property
    def native_resolution(self) -> bool:
        """Whether images come at their own size (a native vision encoder), each with its own tokens."""
        return bool(getattr(self.vision, "native_resolution", False))

    @property
    def position_dims(self) -> int:
        """1: the LLM takes 1-D positions; 3: M-RoPE's (temporal, height, width)."""
        return int(getattr(self.llm, "position_dims", 1))

    @property
    def num_image_tokens(self) -> int:
        """``<imgpad>`` tokens per image at the configured image size (fixed-size models only)."""
        if self.native_resolution:
            raise ValueError("a native-resolution model gives each image its own number of tokens: use image_tokens")
        return self.adapter.output_length(self.vision.grid)

    @property
    def image_tokens(self) -> int | Callable[[Sequence[int]], int]:
        """``<imgpad>`` tokens per image, as :class:`~lavis.processors.conversation.ConversationEncoder`
        takes them: a number (fixed size) or a function of the image's grid ``(t, h, w)`` (native)."""
        return self.adapter.output_length if self.native_resolution else self.num_image_tokens

    def token_grids(self, pixel_values: torch.Tensor | PatchImages | None) -> list[tuple[int, int, int] | None]:
        """Each image's tokens as a row-major ``(t, h, w)`` grid (None where the adapter's tokens form
        none, e.g. the resampler's queries), from the input's shapes alone."""
        if num_images(pixel_values) == 0:
            return []
        if isinstance(pixel_values, PatchImages):
            return [self.adapter.token_grid(grid) for grid in pixel_values.grid_thw.tolist()]
        grid = self.vision.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        return [self.adapter.token_grid(grid)] * pixel_values.shape[0]

    def llm_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None,
                         pixel_values: torch.Tensor | PatchImages | None = None) -> torch.Tensor | None:
        """The LLM's position ids. A 1-D LLM gets ``position_ids`` as given (None: its own). An M-RoPE LLM
        gets the ``[3, B, L]`` ids of :func:`~lavis.models.positions.mrope_position_ids` over the 1-D
        positions: ``position_ids``, else from the attention mask (``[B, L]``: attended tokens counted,
        pads at 0), else ``0..L-1``; ``[3, B, L]`` ``position_ids`` are used as given."""
        if self.position_dims == 1 or (position_ids is not None and position_ids.dim() == 3):
            return position_ids
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = position_ids_from_mask(attention_mask)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        grids = self.token_grids(pixel_values)
        if any(grid is None for grid in grids):
            raise ValueError(f"model.llm takes 3-D positions, and model.adapter ({type(self.adapter).__name__}) gives "
                             "its image tokens no grid")
        return mrope_position_ids(input_ids, position_ids, grids, self.pad_ids, self.time_intervals(pixel_values))

    @property
    def pad_ids(self) -> list[int]:
        """The pad tokens of image and video spans."""
        return list(dict.fromkeys((self.image_pad_id, self.video_pad_id)))

    def time_intervals(self, pixel_values: torch.Tensor | PatchImages | None) -> list[float] | None:
        """Each item's temporal position step: 1, except a video's under a vision encoder with
        ``tokens_per_second`` (Qwen2.5-VL's time-aligned positions: tokens_per_second x seconds per
        temporal patch); None when all are 1."""
        rate = getattr(self.vision, "tokens_per_second", None)
        if not isinstance(pixel_values, PatchImages) or pixel_values.second_per_grid is None or not rate:
            return None
        return [rate * s if s > 0 else 1.0 for s in pixel_values.second_per_grid.tolist()]

    @property
    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.COMPONENTS}

    def apply_freeze(self, policies: dict[str, FreezePolicy], meta: bool = False) -> None:
        """Apply a freeze policy per component (see :mod:`lavis.models.freeze`); ``meta``: the model is
        on the meta device (shapes only)."""
        for name, policy in policies.items():
            if name not in self.COMPONENTS:
                raise ValueError(f"unknown component '{name}' in freeze policies; components: {self.COMPONENTS}")
            policy.apply(getattr(self, name), meta=meta)
            self.freeze_policies[name] = policy

    def load_weights(
        self, state: dict[str, torch.Tensor], source: str = "", lora_scales: dict[str, float] | None = None
    ) -> tuple[list[str], list[str]]:
        """Load a (possibly partial) state dict, adapting it to this model (e.g. another image size).

        LoRA: plain weights load into the base layers of a model with adapters; adapters load into a
        model without them merged into its weights, which needs ``lora_scales`` (``alpha / r`` per
        component, from the checkpoint's config). Returns (missing, unexpected) keys; shape
        mismatches that cannot be adapted are errors.
        """
        own = self.state_dict()
        state = self._match_lora_names(state, own, lora_scales, source)
        for name, component in self.components.items():
            if hasattr(component, "adapt_state_dict"):
                state = component.adapt_state_dict(state, f"{name}.")
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{source}: shapes do not match this model: {wrong[:5]}")
        result = self.load_state_dict(state, strict=False)
        return result.missing_keys, result.unexpected_keys

    @staticmethod
    def _match_lora_names(
        state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], lora_scales: dict[str, float] | None, source: str
    ) -> dict[str, torch.Tensor]:
        adapters = [k for k in state if ".lora_A." in k or ".lora_B." in k]
        if adapters and not any(k in own for k in adapters):
            if not lora_scales:
                raise ValueError(f"{source}: holds LoRA adapters ({adapters[0]}, ...) but not the LoRA settings to merge "
                                 "them (its config.yaml); merge it with python -m lavis.export --merge-lora first")
            state = merge_lora_state(state, lora_scales, base=own)
        renamed = {}
        for key, value in state.items():
            module, _, leaf = key.rpartition(".")
            based = f"{module}.base_layer.{leaf}"
            renamed[based if key not in own and based in own else key] = value
        return renamed

    def blocks(self) -> dict[str, list[nn.Module]]:
        """The repeated blocks of each component (ViT blocks, LLM decoder layers; the adapter is one
        block): the units of sharding and of activation checkpointing."""
        return {name: list(component_blocks(component)) for name, component in self.components.items()}

    def apply_activation_checkpointing(self) -> list[str]:
        """Wrap every block of the components built with ``gradient_checkpointing: true`` in a
        non-reentrant ``checkpoint_wrapper`` (before any sharding); returns those components' names."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            CheckpointWrapper,
            checkpoint_wrapper,
        )

        wrapped = []
        for name, component in self.components.items():
            if not getattr(component, "activation_checkpointing", False):
                continue
            blocks = {id(b) for b in component_blocks(component) if not isinstance(b, CheckpointWrapper)}
            for parent in list(component.modules()):
                for child_name, child in list(parent.named_children()):
                    if id(child) in blocks:
                        parent.register_module(child_name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
            wrapped.append(name)
        return wrapped

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by canonical name (as in checkpoints: no wrapper prefixes)."""
        return {canonical_name(n): p for n, p in self.named_parameters() if p.requires_grad}

    def parameter_report(self) -> str:
        return format_parameter_counts(parameter_counts(self.components), self.freeze_policies)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        for name, policy in self.freeze_policies.items():
            if policy.keeps_eval_mode:
                getattr(self, name).eval()  # frozen parts keep eval-mode dropout/norm behaviour
        return self

    def _trains(self, module: nn.Module) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def encode_images(self, pixel_values: torch.Tensor | PatchImages) -> torch.Tensor:
        """Images -> their tokens' vectors: ``[n, tokens per image, LLM hidden size]`` at a fixed size,
        ``[tokens, LLM hidden size]`` at native resolution, image after image (each image's tokens
        row-major over its token grid)."""
        grad = contextlib.nullcontext() if self._trains(self.vision) else torch.no_grad()
        with grad:
            if isinstance(pixel_values, PatchImages):
                feats, grid = self.vision(pixel_values.patches, pixel_values.grid_thw)
                if not getattr(self.adapter, "takes_windows", False):
                    feats = windows_to_rows(feats, grid, self.vision.merge_size)
            else:
                feats, grid = self.vision(pixel_values)
        return self.adapter(feats, grid)

    def blank_images(self, device: torch.device) -> torch.Tensor | PatchImages:
        """The smallest image input (zeros) the visual path takes."""
        if self.native_resolution:
            return PatchImages(*self.vision.blank_input(device))
        return torch.zeros(1, 3, self.image_size, self.image_size, device=device)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | PatchImages | None = None) -> torch.Tensor:
        """Token embeddings with the image vectors in place of the ``<imgpad>`` embeddings."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if num_images(pixel_values) > 0:
            feats = self.encode_images(pixel_values).flatten(0, -2).to(embeds.dtype)
            image_mask = torch.isin(input_ids, torch.tensor(self.pad_ids, device=input_ids.device))
            expected = int(image_mask.sum())
            if feats.shape[0] != expected:
                raise ValueError(
                    f"{num_images(pixel_values)} images give {feats.shape[0]} image vectors for the {expected} <imgpad> positions"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats)
        elif self.vision_every_step or (self.training and (self._trains(self.vision) or self._trains(self.adapter))):
            # A batch without images still runs the visual path, on a blank image weighted by zero: trained
            # visual parameters then get a (zero) gradient on every rank (DDP waits for all of them), and
            # sharded ones are gathered on every rank (FSDP's collectives must match across ranks).
            embeds = embeds + 0.0 * self.encode_images(self.blank_images(embeds.device)).sum().to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | PatchImages | None = None,
        labels: torch.Tensor | None = None,
        reduction: Literal["sum", "none"] = "sum",
        **llm_kwargs,
    ):
        """With ``labels``: the next-token loss (:class:`LMLoss`, or :class:`TokenLosses` with
        ``reduction="none"``). Without: the LLM's own output (logits, cache) for the multimodal input.

        Training and scoring go through here, never around it: DDP and FSDP hook ``forward`` (gradient
        synchronisation, parameter gathering). ``llm_kwargs`` reach the LLM; with labels they are the
        attention kernels' extra inputs (e.g. packed ``cu_seq_lens_q``).
        """
        if labels is None:
            embeds = self.embed_inputs(input_ids, pixel_values)
            position_ids = self.llm_position_ids(input_ids, attention_mask, position_ids, pixel_values)
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **llm_kwargs)
        losses, selected = self.token_losses(input_ids, labels, attention_mask, position_ids, pixel_values, **llm_kwargs)
        if reduction == "none":
            return TokenLosses(losses=losses, selected=selected)
        return LMLoss(loss_sum=losses.sum(), num_tokens=selected.sum())

    def token_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of each supervised next token, and where they are (called by :meth:`forward`).

        Returns ``(losses [n], selected [B, L-1])``: ``losses`` in the order of ``selected.nonzero()``,
        i.e. row by row. The LM head runs only at the selected positions: with SFT masks most
        positions are prompt or image, so this saves most of the head's compute and the
        full-vocabulary logits.
        """
        embeds = self.embed_inputs(input_ids, pixel_values)
        position_ids = self.llm_position_ids(input_ids, attention_mask, position_ids, pixel_values)
        hidden = self.llm.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **attention_kwargs,
        ).last_hidden_state
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][selected]).float()
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, targets[selected], reduction="none"), selected

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **options) -> torch.Tensor:
        """New tokens [B, T] for left-padded prompts; ``options`` as :func:`lavis.models.generation.generate`
        (``max_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``, ``top_p``, ``stop_ids``,
        ``pad_id``). Pass the tokenizer's ``stop_ids`` and ``pad_id``; with no stop ids every row runs
        ``max_new_tokens``.
        """
        from lavis.models.generation import generate

        return generate(self, input_ids, attention_mask, pixel_values, **options)

    def attach_processors(self, processors, system_message: str) -> None:
        """Give the model its tokenizer and image transform (and the chat system message) for :meth:`chat`."""
        self.processors = processors
        self.system_message = system_message

    def chat(self, query, history=None, **options):
        """One chat turn: ``(response, history)``; see :func:`lavis.models.chat.chat` for the arguments."""
        from lavis.models.chat import chat

        return chat(self, query, history, **options)
