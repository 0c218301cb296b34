"""Visual encoder: any timm ViT by name, random init or a local weights file."""

from __future__ import annotations

import logging
import math
import sys
import types
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from lavis.common.checkpoint import load_weights_file
from lavis.common.registry import registry
from lavis.models.vision.blocks import ViTBlocks

log = logging.getLogger(__name__)


@registry.register("vision_encoder", "timm_vit")
class TimmViT(ViTBlocks, nn.Module):
    """A timm Vision Transformer returning patch features [B, rows*cols, width] (prefix tokens dropped).

    ``model_kwargs`` are passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim`` for a small
    preset). Position embeddings follow ``image_size``: a weights file trained at another size is
    interpolated on load, and inputs of another size are interpolated on the fly. ``pos_embed_init``:
    ``random`` (timm's) or ``sincos`` (2D sin-cos values, for ViTs trained from scratch).

    ``pos_embed_grid``: keep the position table at this many patches per side whatever
    ``image_size``, and resize it to every input's patch grid as Qwen-VL's ViT does (its 16x16 table
    serves 448 px): bicubic, ``align_corners=False``, without the antialiasing timm's own resize
    applies. Needs a ViT without prefix (class or register) tokens.
    """

    EMBEDDING_PARTS = ("pos_embed", "cls_token", "reg_token", "patch_embed", "norm_pre")

    def __init__(
        self,
        name: str,
        image_size: int,
        pretrained: str | None = None,
        class_token: bool | None = None,
        model_kwargs: dict | None = None,
        gradient_checkpointing: bool = False,
        pos_embed_init: Literal["random", "sincos"] = "random",
        pos_embed_grid: int | None = None,
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
        on_meta = torch.get_default_device().type == "meta"  # meta: shapes only
        if pos_embed_grid is not None:
            self.resize_pos_embed_as_qwen_vl(pos_embed_grid, init=not on_meta)
        if pos_embed_init == "sincos" and not on_meta:
            self.init_sincos_pos_embed()
        if pretrained and not on_meta:
            self.load_pretrained(pretrained)
        # Applied by the composite model (VisionLanguageModel.apply_activation_checkpointing), per block.
        self.activation_checkpointing = gradient_checkpointing

    def resize_pos_embed_as_qwen_vl(self, grid: int, init: bool) -> None:
        """Keep a ``grid`` x ``grid`` position table, resized at every forward (see the class docstring)."""
        if self.model.num_prefix_tokens or self.model.pos_embed is None:
            raise ValueError("timm_vit: pos_embed_grid needs a ViT with position embeddings and no class or "
                             "register tokens (set class_token: false)")
        self.model.set_input_size(img_size=(grid * self.patch_size[0], grid * self.patch_size[1]))
        if init:
            nn.init.trunc_normal_(self.model.pos_embed, std=0.02)  # timm's initialisation of the table
        self.model._pos_embed = types.MethodType(add_pos_embed_as_qwen_vl, self.model)

    @torch.no_grad()
    def init_sincos_pos_embed(self) -> None:
        """Fixed 2D sin-cos values as the (still trainable) position embeddings' starting point; prefix
        (class) positions start at zero. Spatial layout is then known from step 0, which a ViT trained
        from scratch on little data otherwise learns slowly."""
        from lavis.models.adapters.qwen_resampler import get_2d_sincos_pos_embed

        pos_embed = self.model.pos_embed
        rows, cols = self.model.patch_embed.grid_size
        if rows != cols:
            raise ValueError(f"timm_vit: pos_embed_init=sincos needs a square patch grid, got {rows}x{cols}")
        table = get_2d_sincos_pos_embed(pos_embed.shape[-1], rows).to(pos_embed.dtype)
        pos_embed.zero_()
        pos_embed[0, pos_embed.shape[1] - rows * cols :] = table

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

    def adapt_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Resample a checkpoint's position embeddings when it was trained at another image size."""
        key = f"{prefix}model.pos_embed"
        ours = self.model.pos_embed
        if key in state and ours is not None and state[key].shape != ours.shape:
            from timm.layers import resample_abs_pos_embed

            prefix_tokens = 0 if self.model.no_embed_class else self.model.num_prefix_tokens
            old_grid = int(math.isqrt(state[key].shape[1] - prefix_tokens))
            state[key] = resample_abs_pos_embed(
                state[key], new_size=list(self.model.patch_embed.grid_size), old_size=[old_grid, old_grid],
                num_prefix_tokens=prefix_tokens,
            )
            log.info("interpolated %s from a %dx%d to a %dx%d patch grid", key, old_grid, old_grid, *self.model.patch_embed.grid_size)
        return state

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> ([B, rows*cols, width], (rows, cols))."""
        feats = self.model.forward_features(pixel_values)
        feats = feats[:, self.model.num_prefix_tokens :]
        return feats, self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])


def add_pos_embed_as_qwen_vl(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Replaces timm's ``VisionTransformer._pos_embed`` under ``pos_embed_grid``: ``x`` is the patch
    embedding ``[B, rows, cols, width]``; the table is resized to ``(rows, cols)`` exactly as Qwen-VL's
    ``get_abs_pos`` (:func:`~lavis.models.adapters.qwen_resampler.resize_pos_embed`)."""
    from lavis.models.adapters.qwen_resampler import resize_pos_embed

    batch, rows, cols, width = x.shape
    table = resize_pos_embed(vit.pos_embed[0], (rows, cols))
    return vit.pos_drop(x.reshape(batch, rows * cols, width) + table)
