"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints built offline, as transformers writes them (a test helper
module, not a test file): :func:`tiny_config`, :func:`tiny_tokenizer`, :func:`tiny_checkpoint`.

The tokenizer is the framework's embedded BPE (``lavis/assets/tokenizer/tokenizer.json``, 1,024
tokens) with Qwen2-VL's special tokens in Qwen2-VL's order from id 1024 (``<|endoftext|>`` 1024 ...
``<|video_pad|>`` 1037), so ids differ from the real vocabulary but the structure is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from lavis.processors.tokenizer import EMBEDDED_TOKENIZER_PATH

Kind = Literal["qwen2_vl", "qwen2_5_vl"]
Layout = Literal["released", "transformers5"]

# Qwen2-VL's special tokens in its own order (151643 ... 151656 in the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
FIRST_SPECIAL_ID = 1024  # the embedded BPE's vocabulary size
TOKEN_IDS = {token: FIRST_SPECIAL_ID + i for i, token in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 1088  # a bit over the tokenizer's 1,038 (releases pad theirs too)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64

# Qwen2-VL-7B-Instruct's chat template (its chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def tiny_config(kind: Kind):
    """A tiny random architecture of ``kind`` (Qwen2-VL: separate lm_head; Qwen2.5-VL: tied embeddings)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    tied = kind == "qwen2_5_vl"
    text = {
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        # head_dim 16: mrope_section (temporal, height, width) sums to head_dim / 2
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": tied, "bos_token_id": TOKEN_IDS["<|endoftext|>"], "eos_token_id": TOKEN_IDS["<|im_end|>"],
    }
    ids = {
        "image_token_id": TOKEN_IDS["<|image_pad|>"], "video_token_id": TOKEN_IDS["<|video_pad|>"],
        "vision_start_token_id": TOKEN_IDS["<|vision_start|>"], "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],
    }
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
    if kind == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=4)  # hidden_size: the merger's output, the LLM's width
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    if kind == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1],
                      hidden_act="silu")
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    raise ValueError(f"kind: qwen2_vl or qwen2_5_vl, got {kind!r}")


def tiny_tokenizer(directory: str | Path) -> Path:
    """A Qwen2-style fast tokenizer in ``directory`` (tokenizer.json, tokenizer_config.json, vocab.json,
    merges.txt, chat_template.jinja) that ``AutoTokenizer.from_pretrained`` loads offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads(EMBEDDED_TOKENIZER_PATH.read_text())
    assert len(data["model"]["vocab"]) == FIRST_SPECIAL_ID, "the embedded tokenizer changed size"
    # The framework's own added tokens (<|endoftext|>, <ref>, <img>, ...) give way to Qwen2-VL's.
    data["added_tokens"] = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for token, i in TOKEN_IDS.items()
    ]
    backend = Tokenizer.from_str(json.dumps(data))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 model_max_length=32768, clean_up_tokenization_spaces=False)
    hf.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, errors="replace", split_special_tokens=False)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    # The slow-tokenizer files a release carries too.
    vocab = data["model"]["vocab"]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


def random_state(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Every parameter drawn anew (std ``scale``; norm weights around 1), so that no two tensors are alike.
    A larger ``scale`` than transformers' 0.02 makes the logits depend visibly on positions and images."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            values = torch.randn(p.shape, generator=generator) * scale
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                values += 1.0
            p.copy_(values.to(p.dtype))


def hf_state(model, layout: Layout) -> dict[str, torch.Tensor]:
    """The model's tensors by their names in ``layout``: transformers 5's own (``model.visual.*``,
    ``model.language_model.*``, ``lm_head.*``) or the released one (``visual.*``, ``model.*``, ``lm_head.*``);
    ``lm_head.weight`` left out where tied."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    if layout == "transformers5":
        return state
    if layout != "released":
        raise ValueError(f"layout: released or transformers5, got {layout!r}")
    renamed = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key.removeprefix("model.")
        elif key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        renamed[key] = value
    return renamed


def tiny_checkpoint(directory: str | Path, kind: Kind, layout: Layout = "released", shards: int = 2, seed: int = 0,
                    dtype: torch.dtype = torch.float32, scale: float = 0.02) -> Path:
    """A random tiny ``kind`` model saved as a complete local checkpoint in ``directory``: config.json,
    safetensors shards + index (``shards`` > 1: the size limit of a shard is 1 / ``shards`` of the whole;
    1: one model.safetensors), generation_config.json, the tokenizer and preprocessor_config.json (the
    released layout with Qwen2-VL's own ``min_pixels`` / ``max_pixels`` keys, transformers 5's with
    ``size``), so that ``AutoProcessor`` and ``*ForConditionalGeneration.from_pretrained``
    load it offline."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(kind)
    cls = Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(config)
    random_state(model, seed, scale)
    model.to(dtype)
    state = hf_state(model, layout)
    numel = sum(v.numel() * v.element_size() for v in state.values())
    save_torch_state_dict(state, directory, max_shard_size=numel // shards + 1 if shards > 1 else numel + 1)
    config.architectures = [cls.__name__]
    config.dtype = dtype
    config.save_pretrained(directory)
    if layout == "released":  # as published: the text config's keys at the top level, no text_config
        content = json.loads((directory / "config.json").read_text())
        text = content.pop("text_config")
        text.pop("model_type", None)
        rope = text.pop("rope_parameters")
        text.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
        content.update({k: v for k, v in text.items() if k not in content})
        content["torch_dtype"] = content.pop("dtype")
        content["vision_config"].pop("model_type", None)
        (directory / "config.json").write_text(json.dumps(content, indent=2) + "\n")
    GenerationConfig(bos_token_id=TOKEN_IDS["<|endoftext|>"], eos_token_id=[TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]],
                     pad_token_id=TOKEN_IDS["<|endoftext|>"], do_sample=False).save_pretrained(directory)
    tiny_tokenizer(directory)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(directory)
    content = json.loads((directory / "preprocessor_config.json").read_text())
    content["processor_class"] = "Qwen2_5_VLProcessor" if kind == "qwen2_5_vl" else "Qwen2VLProcessor"
    if layout == "released":  # as Qwen2-VL was published: min_pixels / max_pixels, no size (transformers 5 writes size)
        size = content.pop("size")
        content.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (directory / "preprocessor_config.json").write_text(json.dumps(content, indent=2) + "\n")
    return directory
