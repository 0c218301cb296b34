"""The composite VLM: visual encoder -> adapter -> image vectors scattered into the LLM's embeddings."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lavis.common.registry import registry
from lavis.models.freeze import apply_freeze_policy, format_parameter_counts, parameter_counts
from lavis.processors.conversation import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class LMLoss:
    """Summed cross-entropy over the supervised tokens, and their count."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor


@registry.register("model", "qwen_vl")
class VisionLanguageModel(nn.Module):
    """Qwen-VL's architecture: every ``<imgpad>`` run in the text receives one image's adapter outputs.

    Works with any registered vision encoder, adapter and causal LM; any number of images per
    sample, anywhere in the text.
    """

    COMPONENTS = ("vision", "adapter", "llm")

    def __init__(self, vision: nn.Module, adapter: nn.Module, llm: nn.Module, image_pad_id: int, image_size: int) -> None:
        super().__init__()
        self.vision = vision
        self.adapter = adapter
        self.llm = llm
        self.image_pad_id = image_pad_id
        self.image_size = image_size
        self.freeze_policies = {name: "trainable" for name in self.COMPONENTS}
        # Set by attach_processors (lavis.load_model does it) for chat().
        self.processors = None
        self.system_message = "You are a helpful assistant."

    @property
    def num_image_tokens(self) -> int:
        """``<imgpad>`` tokens per image at the configured image size."""
        return self.adapter.output_length(self.vision.grid)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.COMPONENTS}

    def apply_freeze(self, policies: dict[str, str]) -> None:
        """Apply a freeze policy per component (see :mod:`lavis.models.freeze`)."""
        for name, policy in policies.items():
            if name not in self.COMPONENTS:
                raise ValueError(f"unknown component '{name}' in freeze policies; components: {self.COMPONENTS}")
            apply_freeze_policy(getattr(self, name), policy)
            self.freeze_policies[name] = policy

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "") -> tuple[list[str], list[str]]:
        """Load a (possibly partial) state dict, adapting it to this model (e.g. another image size).

        Returns (missing, unexpected) keys; shape mismatches that cannot be adapted are errors.
        """
        for name, component in self.components.items():
            if hasattr(component, "adapt_state_dict"):
                state = component.adapt_state_dict(state, f"{name}.")
        own = self.state_dict()
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{source}: shapes do not match this model: {wrong[:5]}")
        result = self.load_state_dict(state, strict=False)
        return result.missing_keys, result.unexpected_keys

    def parameter_report(self) -> str:
        return format_parameter_counts(parameter_counts(self.components), self.freeze_policies)

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        super().train(mode)
        for name, policy in self.freeze_policies.items():
            if policy == "frozen":
                getattr(self, name).eval()  # frozen parts keep eval-mode dropout/norm behaviour
        return self

    def _trains(self, module: nn.Module) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, tokens per image, LLM hidden size]."""
        grad = contextlib.nullcontext() if self._trains(self.vision) else torch.no_grad()
        with grad:
            feats, grid = self.vision(pixel_values)
        return self.adapter(feats, grid)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image vectors in place of the ``<imgpad>`` embeddings."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = self.encode_images(pixel_values).to(embeds.dtype)
            image_mask = input_ids == self.image_pad_id
            expected = int(image_mask.sum())
            if feats.shape[0] * feats.shape[1] != expected:
                raise ValueError(
                    f"{feats.shape[0]} images x {feats.shape[1]} tokens do not fill the {expected} <imgpad> positions"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats)
        elif self.training and (self._trains(self.vision) or self._trains(self.adapter)):
            # A text-only batch must still touch the visual parameters, or DDP/FSDP ranks desynchronise.
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=embeds.device)
            embeds = embeds + 0.0 * self.encode_images(blank).sum().to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **llm_kwargs,
    ):
        """The LLM's own output (logits, cache) for the multimodal input."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **llm_kwargs)

    def lm_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **attention_kwargs,
    ) -> LMLoss:
        """Next-token cross-entropy summed over supervised tokens.

        The LM head runs only at supervised positions: with SFT masks most positions are
        prompt or image, so this saves most of the head's compute and the full-vocabulary logits.
        ``attention_kwargs`` reach the attention kernels (e.g. packed ``cu_seq_lens_q``).
        """
        losses, selected = self.token_losses(input_ids, labels, attention_mask, position_ids, pixel_values, **attention_kwargs)
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
        """Cross-entropy of each supervised next token, and where they are.

        Returns ``(losses [n], selected [B, L-1])``: ``losses`` in the order of ``selected.nonzero()``,
        i.e. row by row. The LM head runs only at the selected positions.
        """
        embeds = self.embed_inputs(input_ids, pixel_values)
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
        """One chat turn: ``(response, history)``; see :func:`lavis.inference.chat` for the arguments."""
        from lavis.inference import chat

        return chat(self, query, history, **options)
