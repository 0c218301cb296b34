"""Vision-language adapters; importing this package registers them under the "adapter" kind."""

from lavis.models.adapters import mlp, qwen_resampler
from lavis.models.adapters.mlp import LinearAdapter, MLPAdapter
from lavis.models.adapters.qwen_resampler import QwenResampler, get_2d_sincos_pos_embed, resize_pos_embed

__all__ = [
    "mlp",
    "qwen_resampler",
    "LinearAdapter",
    "MLPAdapter",
    "QwenResampler",
    "get_2d_sincos_pos_embed",
    "resize_pos_embed",
]
