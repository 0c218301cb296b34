"""Processors: tokenizers, image transforms, conversation encoding."""

from lavis.processors import image, tokenizer  # noqa: F401  (registers clip_image, hf_tokenizer, qwen_tiktoken)
