"""Visual encoder: the Qwen2-VL / Qwen2.5-VL vision transformer, as transformers implements it.

The transformers module (``Qwen2VisionTransformerPretrainedModel`` or
``Qwen2_5_VisionTransformerPretrainedModel``) is held as ``self.model`` with its ``merger`` taken
out: the merger is this framework's ``patch_merger`` adapter (same parameter names). Parameter
names are therefore transformers' visual-module names less ``merger.*``: ``model.patch_embed.proj.weight``,
``model.blocks.0.attn.qkv.weight``, ...

Native resolution: the input is the flattened patches of any number of images of any sizes, in
the order Qwen2-VL's image processor emits them, with one ``(t, h, w)`` patch grid per image; the
images attend only to themselves (``cu_seqlens``, no padding).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from lavis.common.registry import registry
from lavis.models.hf_checkpoint import load_into, visual_key
from lavis.models.vision.blocks import ViTBlocks

log = logging.getLogger(__name__)

# model_type -> (vision config class, vision transformer class, the config field giving the ViT's width)
FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel], str]] = {
    # Qwen2-VL's vision hidden_size is the merger's output width (the LLM's), not the ViT's.
    "qwen2_vl": (Qwen2VLVisionConfig, Qwen2VisionTransformerPretrainedModel, "embed_dim"),
    # Qwen2.5-VL's merger output width is out_hidden_size.
    "qwen2_5_vl": (Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel, "hidden_size"),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bookkeeping keys of a saved config that are not architecture.
CONFIG_METADATA_KEYS = ("model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype",
                        "_attn_implementation", "_attn_implementation_autoset")


class UngroupWindows(nn.Module):
    """Stands in for Qwen2.5-VL's merger: each ``merge_size**2`` consecutive rows (a merge window, what
    the merger would have merged) become one row. transformers' forward then un-permutes those rows
    from window order to the processor's (``[argsort(window_index)]``, as it does the merged tokens),
    and :meth:`Qwen2VLViT.forward` flattens them back to one row per patch."""

    def __init__(self, spatial_merge_unit: int) -> None:
        super().__init__()
        self.spatial_merge_unit = spatial_merge_unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.spatial_merge_unit * x.shape[-1])


@registry.register("vision_encoder", "qwen2_vl_vit")
class Qwen2VLViT(ViTBlocks, nn.Module):
    """Qwen2-VL / Qwen2.5-VL ViT (transformers' module, merger removed) returning one feature per input patch.

    ``config``: an inline vision config; ``model_type`` (``qwen2_vl`` | ``qwen2_5_vl``) picks the
    family, the other keys are fields of transformers' ``Qwen2VLVisionConfig`` /
    ``Qwen2_5_VLVisionConfig``. ``pretrained``: a local transformers Qwen2-VL / Qwen2.5-VL checkpoint
    directory; its ``vision_config`` is the architecture (``config`` keys override it) and its
    vision weights (less the merger) are loaded.
    """

    EMBEDDING_PARTS = ("patch_embed", "rotary_pos_emb")

    native_resolution = True

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        attn_implementation: str = "sdpa",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"qwen2_vl_vit: model.vision.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                             f"got {attn_implementation!r}")
        if dtype not in DTYPES:
            raise ValueError(f"qwen2_vl_vit: model.vision.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model_type, fields = resolve_vision_config(config, pretrained)
        config_class, model_class, width_field = FAMILIES[model_type]
        vision_config = config_class(**fields)
        self.model_type = model_type
        self.model = model_class._from_config(vision_config, attn_implementation=attn_implementation, dtype=DTYPES[dtype])
        self.merge_size = int(vision_config.spatial_merge_size)
        # The merger is the patch_merger adapter. The forward still calls self.model.merger: Qwen2-VL
        # returns its output as is (Identity), Qwen2.5-VL un-permutes it from window order (UngroupWindows).
        self.model.merger = nn.Identity() if model_type == "qwen2_vl" else UngroupWindows(self.merge_size**2)
        self.width = int(getattr(vision_config, width_field))
        self.patch_size = int(vision_config.patch_size)
        self.temporal_patch_size = int(vision_config.temporal_patch_size)
        # Qwen2.5-VL: a video's temporal positions step tokens_per_second x seconds per temporal patch (None: 1 each)
        self.tokens_per_second = getattr(vision_config, "tokens_per_second", None) if model_type == "qwen2_5_vl" else None
        self.in_features = int(vision_config.in_channels) * self.temporal_patch_size * self.patch_size**2
        if pretrained and torch.get_default_device().type != "meta":  # meta: shapes only, no weights read
            self.load_pretrained(pretrained)
        # Applied by the composite model (VisionLanguageModel.apply_activation_checkpointing), per block;
        # transformers' own gradient checkpointing stays off.
        self.activation_checkpointing = gradient_checkpointing

    def load_pretrained(self, path: str | Path) -> None:
        """Load the vision weights (less the merger) of a local transformers Qwen2-VL / Qwen2.5-VL checkpoint."""
        load_into(self.model, Path(path), lambda key: visual_key(key, merger=False), "model.vision.pretrained")
        log.info("vision weights loaded from %s", path)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, in_features] patches of the images in ``grid_thw`` ([n, 3]: t, h, w in patches) ->
        ([N, width], grid_thw): one feature per input patch, in the input's order."""
        out = self.model(pixel_values.to(self.dtype), grid_thw=grid_thw)
        # pooler_output is the stand-in merger's output: the hidden states in the input's order (see __init__).
        return out.pooler_output.reshape(pixel_values.shape[0], self.width), grid_thw

    def output_grid(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The patch grid (t, h, w) of each image's output features: the input grid (one feature per patch)."""
        return grid_thw

    def blank_input(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest valid input, zeros: one image of one merge window (grid ``(1, merge_size, merge_size)``).
        Run on text-only batches so that the vision parameters get (zero) gradients."""
        pixel_values = torch.zeros(self.merge_size**2, self.in_features, device=device, dtype=self.dtype)
        grid_thw = torch.tensor([[1, self.merge_size, self.merge_size]], device=device, dtype=torch.long)
        return pixel_values, grid_thw


def resolve_vision_config(config: dict[str, Any] | None, pretrained: str | None) -> tuple[str, dict[str, Any]]:
    """(model_type, vision config fields): a checkpoint's ``vision_config`` (when ``pretrained``) updated by ``config``."""
    fields: dict[str, Any] = {}
    model_type = None
    # On the meta device (counting parameters) a checkpoint not on this machine gives way to the inline config.
    if pretrained and not (torch.get_default_device().type == "meta" and not (Path(pretrained) / "config.json").is_file()):
        checkpoint_type, fields = read_checkpoint_config(Path(pretrained))
        model_type = checkpoint_type
    override = dict(config or {})
    config_type = override.pop("model_type", None)
    if config_type is not None:
        if model_type is not None and config_type != model_type:
            raise ValueError(f"qwen2_vl_vit: model.vision.config.model_type is {config_type!r} but {pretrained} is a "
                             f"{model_type!r} checkpoint")
        model_type = config_type
    model_type = model_type or "qwen2_vl"
    if model_type not in FAMILIES:
        raise ValueError(f"qwen2_vl_vit: model.vision.config.model_type must be one of {', '.join(FAMILIES)}, got {model_type!r}")
    config_class = FAMILIES[model_type][0]
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.attribute_map)
    unknown = sorted(set(override) - known)
    if unknown:  # transformers keeps unknown keys as attributes silently: a misspelt field would change nothing
        raise ValueError(f"qwen2_vl_vit: model.vision.config.{unknown[0]} is not a field of {config_class.__name__} "
                         f"(model_type {model_type}); its fields: {', '.join(sorted(known))}")
    fields.update(override)
    for key in CONFIG_METADATA_KEYS:
        fields.pop(key, None)
    if "in_chans" in fields:  # released checkpoints' name for in_channels, which transformers does not map
        fields.setdefault("in_channels", fields.pop("in_chans"))
    return model_type, fields


def read_checkpoint_config(path: Path) -> tuple[str, dict[str, Any]]:
    """(model_type, vision_config) of a transformers Qwen2-VL / Qwen2.5-VL checkpoint directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"qwen2_vl_vit: {path} holds no config.json (model.vision.pretrained must be a "
                                "transformers Qwen2-VL / Qwen2.5-VL checkpoint directory)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in FAMILIES or not isinstance(config.get("vision_config"), dict):
        raise ValueError(f"qwen2_vl_vit: {config_file} is not a Qwen2-VL / Qwen2.5-VL config (model_type {model_type!r}, "
                         f"expected one of {', '.join(FAMILIES)}, with a vision_config)")
    return model_type, dict(config["vision_config"])
