"""The ``qwen2_vl_vit`` vision encoder: parity with transformers' Qwen2-VL / Qwen2.5-VL vision modules
on tiny random configs, per-image isolation, gradients, activation checkpointing, meta builds,
loading transformers checkpoints, the registry and the default YAML."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from lavis.common.registry import registry
from lavis.models.vision.qwen2_vl_vit import Qwen2VLViT

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "vision" / "qwen2_vl_vit.yaml"

VISION = {
    "qwen2_vl": {"depth": 4, "embed_dim": 32, "hidden_size": 48, "num_heads": 2, "patch_size": 14, "temporal_patch_size": 2,
                 "spatial_merge_size": 2},
    # window_size 56 = 2x2 merged tokens per window: the images below span several windows.
    "qwen2_5_vl": {"depth": 4, "hidden_size": 32, "out_hidden_size": 48, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                   "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 56, "fullatt_block_indexes": [1, 3]},
}
REFERENCE = {
    "qwen2_vl": (Qwen2VLVisionConfig, Qwen2VisionTransformerPretrainedModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLConfig,
                   Qwen2_5_VLForConditionalGeneration),
}
TEXT = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300,
        "intermediate_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
GRID = torch.tensor([[1, 6, 10], [1, 12, 4]])  # (t, h, w) in patches: two non-square images of different sizes
FAMILIES = list(VISION)


def reference(model_type: str, seed: int = 0) -> nn.Module:
    """transformers' own vision module (merger included), fp32, eager mode off."""
    config_class, model_class, _, _ = REFERENCE[model_type]
    torch.manual_seed(seed)
    return model_class._from_config(config_class(**VISION[model_type]), attn_implementation="sdpa", dtype=torch.float32).eval()


def ours_like(ref: nn.Module, model_type: str) -> Qwen2VLViT:
    vit = Qwen2VLViT(config={"model_type": model_type, **VISION[model_type]}).eval()
    vit.model.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("merger.")}, strict=True)
    return vit


def patches(grid: torch.Tensor, in_features: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), in_features, generator=generator)


def vision_state(vision: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vision.state_dict().items() if not k.startswith("merger.")}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_parity_with_transformers(model_type):
    ref = reference(model_type)
    vit = ours_like(ref, model_type)
    pixels = patches(GRID, vit.in_features)
    with torch.no_grad():
        expected = ref(pixels, grid_thw=GRID).pooler_output
        feats, grid = vit(pixels, GRID)
        merged = ref.merger(feats)  # transformers' merger on our (processor-ordered) features
    assert feats.shape == (pixels.shape[0], vit.width)
    assert torch.equal(grid, GRID)
    assert merged.shape == expected.shape
    assert (merged - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", FAMILIES)
def test_images_attend_only_to_themselves(model_type):
    vit = ours_like(reference(model_type), model_type)
    pixels = patches(GRID, vit.in_features)
    with torch.no_grad():
        together, _ = vit(pixels, GRID)
        start = 0
        for row in GRID:
            n = int(row.prod())
            alone, _ = vit(pixels[start : start + n], row[None])
            assert (alone - together[start : start + n]).abs().max().item() <= 1e-5
            start += n


def test_width_and_shapes():
    v2 = Qwen2VLViT(config={"model_type": "qwen2_vl", **VISION["qwen2_vl"]})
    v25 = Qwen2VLViT(config={"model_type": "qwen2_5_vl", **VISION["qwen2_5_vl"]})
    assert (v2.width, v25.width) == (32, 32)  # embed_dim resp. hidden_size, not the merger's 48
    for vit in (v2, v25):
        assert vit.native_resolution is True
        assert (vit.patch_size, vit.temporal_patch_size, vit.merge_size, vit.in_features) == (14, 2, 2, 3 * 2 * 14 * 14)
        assert not any(name.startswith("model.merger") for name, _ in vit.named_parameters())
        assert "model.blocks.0.attn.qkv.weight" in dict(vit.named_parameters())
        assert vit.blocks() == list(vit.model.blocks) and vit.num_layers == 4
        assert vit.layer_id("model.patch_embed.proj.weight") == 0
        assert vit.layer_id("model.blocks.3.attn.qkv.weight") == 4
        assert vit.layer_id("model.post_norm.weight") == 5
        assert torch.equal(vit.output_grid(GRID), GRID)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_blank_input_runs(model_type):
    vit = Qwen2VLViT(config={"model_type": model_type, **VISION[model_type]})
    pixels, grid = vit.blank_input("cpu")
    assert grid.tolist() == [[1, 2, 2]] and grid.dtype == torch.long
    assert pixels.shape == (4, vit.in_features) and not pixels.any()
    feats, _ = vit(pixels, grid)
    (feats.sum() * 0).backward()
    assert all(p.grad is not None for p in vit.parameters())


def block_params_with_grad(vit: Qwen2VLViT) -> dict[str, torch.Tensor]:
    """Gradients by parameter name, checkpoint wrappers' prefixes removed."""
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in vit.named_parameters()}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradients_reach_every_block(model_type):
    vit = Qwen2VLViT(config={"model_type": model_type, **VISION[model_type]}).train()
    feats, _ = vit(patches(GRID, vit.in_features), GRID)
    feats.sum().backward()
    grads = block_params_with_grad(vit)
    assert grads["model.patch_embed.proj.weight"] is not None
    for i in range(vit.num_layers):
        names = [n for n in grads if n.startswith(f"model.blocks.{i}.")]
        assert names
        for name in names:
            assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        assert any(grads[n].abs().sum() > 0 for n in names)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_checkpoint_wrapped_blocks_match(model_type):
    plain = Qwen2VLViT(config={"model_type": model_type, **VISION[model_type]}, gradient_checkpointing=True).train()
    assert plain.activation_checkpointing is True
    assert not plain.model.gradient_checkpointing  # transformers' own checkpointing stays off
    wrapped = copy.deepcopy(plain)
    # As VisionLanguageModel.apply_activation_checkpointing does it.
    ids = {id(b) for b in wrapped.blocks()}
    for parent in list(wrapped.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in ids:
                parent.register_module(name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.blocks())
    pixels = patches(GRID, plain.in_features)
    out_plain, _ = plain(pixels, GRID)
    out_wrapped, _ = wrapped(pixels, GRID)
    assert torch.equal(out_plain, out_wrapped)
    (out_plain**2).sum().backward()
    (out_wrapped**2).sum().backward()
    grads_plain, grads_wrapped = block_params_with_grad(plain), block_params_with_grad(wrapped)
    assert grads_plain.keys() == grads_wrapped.keys()
    for name, grad in grads_plain.items():
        assert grads_wrapped[name] is not None and torch.allclose(grad, grads_wrapped[name], atol=1e-6, rtol=0), name


def save_conditional_generation(model_type: str, directory: Path, layout: str) -> nn.Module:
    """A tiny transformers Qwen2-VL / Qwen2.5-VL model saved to ``directory``; returns its vision module.

    ``layout``: ``save_pretrained`` (transformers 5 writes the released names: ``visual.*``, ``model.*``
    for the LLM, ``lm_head.*``; sharded here), or ``in_memory`` (the module's own names,
    ``model.visual.*``, ``model.language_model.*``, as ``save_file(model.state_dict())`` gives).
    """
    _, _, config_class, model_class = REFERENCE[model_type]
    torch.manual_seed(3)
    model = model_class(config_class(text_config=dict(TEXT), vision_config=dict(VISION[model_type])))
    if layout == "save_pretrained":
        model.save_pretrained(directory, max_shard_size="100KB")
    else:
        model.config.save_pretrained(directory)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return model.model.visual


@pytest.mark.parametrize("layout", ["save_pretrained", "in_memory"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_pretrained_loads_vision_weights(model_type, layout, tmp_path):
    source = save_conditional_generation(model_type, tmp_path, layout)
    if layout == "save_pretrained":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert any(k.startswith("visual.blocks.") for k in index["weight_map"]) and len(set(index["weight_map"].values())) > 1
    vit = Qwen2VLViT(pretrained=str(tmp_path))
    assert vit.model_type == model_type and vit.num_layers == VISION[model_type]["depth"]
    expected = vision_state(source)
    ours = vit.model.state_dict()
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_pretrained_config_overrides_and_missing_weights(tmp_path):
    save_conditional_generation("qwen2_vl", tmp_path, "in_memory")
    with pytest.raises(ValueError, match="model.vision.config.model_type"):
        Qwen2VLViT(config={"model_type": "qwen2_5_vl"}, pretrained=str(tmp_path))
    # A deeper ViT than the checkpoint holds: blocks 4 and 5 have no weights.
    with pytest.raises(ValueError, match=rf"{tmp_path}.*blocks\.4\."):
        Qwen2VLViT(config={"depth": 6}, pretrained=str(tmp_path))


def test_meta_device_reads_no_weights(tmp_path):
    save_conditional_generation("qwen2_5_vl", tmp_path, "in_memory")
    (tmp_path / "model.safetensors").unlink()  # a weight read would fail
    with pytest.raises(ValueError, match=r"model\.vision\.pretrained: no model\.safetensors"):
        Qwen2VLViT(pretrained=str(tmp_path))
    with torch.device("meta"):
        vit = Qwen2VLViT(pretrained=str(tmp_path), dtype="bfloat16")
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in vit.parameters())
    assert vit.width == 32 and vit.model_type == "qwen2_5_vl"


def test_registry_and_errors():
    assert registry.get("vision_encoder", "qwen2_vl_vit") is Qwen2VLViT
    with pytest.raises(ValueError, match=r"model\.vision\.config\.model_type.*qwen2_vl, qwen2_5_vl"):
        Qwen2VLViT(config={"model_type": "qwen3_vl"})
    with pytest.raises(ValueError, match=r"model\.vision\.config\.embed_dim is not a field of Qwen2_5_VLVisionConfig"):
        Qwen2VLViT(config={"model_type": "qwen2_5_vl", "embed_dim": 32})
    with pytest.raises(ValueError, match="attn_implementation"):
        Qwen2VLViT(config={"model_type": "qwen2_vl", **VISION["qwen2_vl"]}, attn_implementation="magic")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dtype_and_attention(attn):
    vit = Qwen2VLViT(config={"model_type": "qwen2_5_vl", **VISION["qwen2_5_vl"]}, attn_implementation=attn, dtype="bfloat16")
    assert vit.model.config._attn_implementation == attn
    assert all(p.dtype == torch.bfloat16 for p in vit.parameters())
    feats, _ = vit(patches(GRID, vit.in_features), GRID)  # float32 input, cast to the module's dtype
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats).all()


def test_default_yaml_builds_on_meta():
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg.pop("type") == "qwen2_vl_vit"
    with torch.device("meta"):
        vit = registry.get("vision_encoder", "qwen2_vl_vit")(**cfg)
    assert (vit.width, vit.num_layers, vit.patch_size, vit.merge_size) == (1280, 32, 14, 2)
    count = sum(p.numel() for p in vit.parameters())
    assert 600e6 < count < 660e6  # Qwen2-VL's ViT without its merger: ~631M
