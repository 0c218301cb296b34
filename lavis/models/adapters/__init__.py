"""Vision-language adapters; importing this package registers them under the "adapter" kind."""

from lavis.models.adapters import mlp, patch_merger, qwen_resampler
from lavis.models.adapters.mlp import LinearAdapter, MLPAdapter
from lavis.models.adapters.patch_merger import PatchMerger
from lavis.models.adapters.qwen_resampler import QwenResampler, get_2d_sincos_pos_embed, resize_pos_embed

__all__ = [
    "mlp",
    "patch_merger",
    "qwen_resampler",
    "LinearAdapter",
    "MLPAdapter",
    "PatchMerger",
    "QwenResampler",
    "get_2d_sincos_pos_embed",
    "resize_pos_embed",
]
