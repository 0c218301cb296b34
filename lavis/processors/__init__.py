"""Processors: tokenizers (and Qwen-VL's special tokens), image transforms, conversation encoding,
boxes and quads. Imports only :mod:`lavis.common`.
"""

from lavis.processors import image, native_image, native_video, tokenizer  # noqa: F401  (registers clip_image, qwen2_vl_image, qwen2_vl_video, hf_tokenizer, qwen_tiktoken)
