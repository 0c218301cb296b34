"""A LAVIS-style framework for training Qwen-VL-style vision-language models."""

__version__ = "0.1.0"


def load_model(path, device: str = "auto", dtype=None):
    """A trained model and its processors; see :func:`lavis.models.loading.load_model`."""
    from lavis.models.loading import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype)
