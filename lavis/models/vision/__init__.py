from lavis.models.vision import timm_vit  # noqa: F401  (registers timm_vit)
