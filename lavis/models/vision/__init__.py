from lavis.models.vision import (
    qwen2_vl_vit,  # noqa: F401  (registers qwen2_vl_vit)
    timm_vit,  # noqa: F401  (registers timm_vit)
)
