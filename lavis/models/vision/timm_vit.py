"""Visual encoder: any timm ViT by name, random init or a local weights file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from lavis.common.checkpoint import load_weights_file
from lavis.common.registry import registry

log = logging.getLogger(__name__)


@registry.register("vision_encoder", "timm_vit")
class TimmViT(nn.Module):
    """A timm Vision Transformer returning patch features [B, rows*cols, width] (prefix tokens dropped).

    ``model_kwargs`` are passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim`` for a small
    preset). Position embeddings follow ``image_size``: a weights file trained at another size is
    interpolated on load, and inputs of another size are interpolated on the fly.
    """

    def __init__(
        self,
        name: str,
        image_size: int,
        pretrained: str | None = None,
        class_token: bool | None = None,
        model_kwargs: dict | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if class_token is not None:
            kwargs["class_token"] = class_token
        self.model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            img_size=image_size,
            dynamic_img_size=True,
            **kwargs,
        )
        self.image_size = image_size
        self.patch_size = tuple(self.model.patch_embed.patch_size)
        self.width = self.model.embed_dim
        if pretrained:
            self.load_pretrained(pretrained)
        if gradient_checkpointing:
            self.model.set_grad_checkpointing(True)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the configured image size."""
        return self.grid_for(self.image_size, self.image_size)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def load_pretrained(self, path: str) -> None:
        """Load a local timm/OpenCLIP checkpoint, resampling position embeddings to our size."""
        state = load_weights_file(Path(path))
        module = sys.modules[type(self.model).__module__]
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, self.model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"{path}: weights missing for {len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}")
        if result.unexpected_keys:
            log.warning("%s: ignored %d unexpected keys, e.g. %s", path, len(result.unexpected_keys), result.unexpected_keys[:5])
        log.info("vision weights loaded from %s", path)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> ([B, rows*cols, width], (rows, cols))."""
        feats = self.model.forward_features(pixel_values)
        feats = feats[:, self.model.num_prefix_tokens :]
        return feats, self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
