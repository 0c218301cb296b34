"""A LAVIS-style framework for training Qwen-VL-style vision-language models."""

__version__ = "0.1.0"
