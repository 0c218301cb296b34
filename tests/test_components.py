"""Components built from local files: timm ViT weights, HF LLM directory, tokenizers, a new adapter."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from lavis.common.config import load_config
from lavis.common.registry import registry
from lavis.models import build_model
from lavis.models.llm.hf_causal_lm import hf_causal_lm
from lavis.models.vision.timm_vit import TimmViT
from lavis.processors.tokenizer import SPECIAL_TOKENS, HFTokenizer

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def test_vit_patch_features_and_grid():
    vit = TimmViT("vit_tiny_patch16_224", image_size=64, class_token=False, model_kwargs=TINY_VIT)
    feats, grid = vit(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 64, 32) and grid == (8, 8) == vit.grid
    feats, grid = vit(torch.randn(1, 3, 96, 64))  # dynamic image size
    assert feats.shape == (1, 96, 32) and grid == (12, 8)
    with_cls = TimmViT("vit_tiny_patch16_224", image_size=64, class_token=True, model_kwargs=TINY_VIT)
    assert with_cls.model.num_prefix_tokens == 1
    assert with_cls(torch.randn(1, 3, 64, 64))[0].shape == (1, 64, 32)  # class token dropped


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vit_loads_local_weights_at_another_size(tmp_path, suffix):
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="", img_size=32, class_token=False, **TINY_VIT
    )
    path = tmp_path / f"vit{suffix}"
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    vit = TimmViT("vit_tiny_patch16_224", image_size=64, pretrained=str(path), class_token=False, model_kwargs=TINY_VIT)
    loaded = vit.model.state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    # 4x4 position grid interpolated to 8x8
    assert state["pos_embed"].shape == (1, 16, 32) and loaded["pos_embed"].shape == (1, 64, 32)
    expected = torch.nn.functional.interpolate(
        state["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", antialias=True
    ).permute(0, 2, 3, 1).reshape(1, 64, 32)
    assert torch.allclose(loaded["pos_embed"], expected, atol=1e-5)


@pytest.mark.parametrize("class_token", [False, True])
def test_vit_sincos_position_init(class_token):
    from lavis.models.adapters.qwen_resampler import get_2d_sincos_pos_embed

    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    vit = TimmViT("vit_tiny_patch16_224", 64, class_token=class_token, model_kwargs=kwargs, pos_embed_init="sincos")
    pos = vit.model.pos_embed.detach()[0]
    assert torch.equal(pos[-64:], get_2d_sincos_pos_embed(32, 8))
    assert not pos[:-64].any()  # the class position starts at zero
    assert vit.model.pos_embed.requires_grad  # a starting point, still trained
    torch.manual_seed(0)
    random_init = TimmViT("vit_tiny_patch16_224", 64, class_token=class_token, model_kwargs=kwargs)
    assert not torch.equal(random_init.model.pos_embed.detach()[0, -64:], pos[-64:])


def test_vit_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        TimmViT("vit_tiny_patch16_224", image_size=64, pretrained=str(tmp_path / "nope.pth"), model_kwargs=TINY_VIT)
    pickled = tmp_path / "evil.pth"
    torch.save({"blocks": object()}, pickled)  # not a plain tensor state dict
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        TimmViT("vit_tiny_patch16_224", image_size=64, pretrained=str(pickled), model_kwargs=TINY_VIT)


def test_llm_and_tokenizer_from_local_directory(tmp_path):
    config = {"model_type": "qwen2", "vocab_size": 1088, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    torch.manual_seed(0)
    inline = hf_causal_lm(config=config)
    inline.save_pretrained(tmp_path / "llm")
    HFTokenizer().hf.save_pretrained(tmp_path / "llm")
    loaded = hf_causal_lm(pretrained=str(tmp_path / "llm"))
    for (name, a), (_, b) in zip(inline.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tok = HFTokenizer(str(tmp_path / "llm"))
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [HFTokenizer().token_id(t) for t in SPECIAL_TOKENS]
    # With a directory, `config` overrides its config.json.
    overridden = hf_causal_lm(pretrained=str(tmp_path / "llm"), config={"attention_dropout": 0.25})
    assert overridden.config.attention_dropout == 0.25 and loaded.config.attention_dropout == 0.0
    with pytest.raises(ValueError, match="set 'pretrained'"):
        hf_causal_lm()
    # On the meta device no weights are read; a directory that is not here falls back to the inline config.
    with torch.device("meta"):
        meta = hf_causal_lm(pretrained=str(tmp_path / "elsewhere"), config=config)
    assert meta.model.embed_tokens.weight.is_meta
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in inline.parameters())


def test_tokenizer_gets_missing_special_tokens_and_llm_is_resized(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_tokens([chr(c) for c in range(97, 123)])
    plain.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(str(tmp_path / "tokenizer.json"))
    assert len(tok) == 26 + len(SPECIAL_TOKENS)
    assert tok.encode("<img></img>") == [tok.img_start_id, tok.img_end_id]


def test_new_adapter_is_one_class_and_an_override(tmp_path):
    """The README's recipe: register a class; select it with --options; its arguments are its keys."""
    from torch import nn

    @registry.register("adapter", "test_avg_pool")
    class AvgPoolAdapter(nn.Module):
        def __init__(self, vision_width: int, llm_hidden_size: int, side: int = 4) -> None:
            super().__init__()
            self.side = side
            self.proj = nn.Linear(vision_width, llm_hidden_size)

        def output_length(self, grid):
            return self.side * self.side

        def forward(self, x, grid):
            b, _, c = x.shape
            pooled = nn.functional.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, c, *grid), self.side)
            return self.proj(pooled.flatten(2).transpose(1, 2))

    cfg = load_config("projects/sft.yaml", ["model.adapter.type=test_avg_pool", "model.adapter.side=3"])
    assert cfg.model.adapter.params == {"side": 3}
    model, _ = build_model(cfg.model)
    assert isinstance(model.adapter, AvgPoolAdapter) and model.num_image_tokens == 9
    with pytest.raises(ValueError, match="did you mean 'side'"):
        load_config("projects/sft.yaml", ["model.adapter.type=test_avg_pool", "model.adapter.sides=3"])
