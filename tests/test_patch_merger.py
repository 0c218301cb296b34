"""The ``patch_merger`` adapter (Qwen2-VL's 2x2 merger): shapes, parity with transformers' own
mergers, the {qwen_resampler, patch_merger, mlp} ablation on the tiny model, freezing."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml

from lavis.common.registry import registry
from lavis.models import build_model
from lavis.models.adapters.patch_merger import PatchMerger
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.sample import SampleProcessor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "adapters" / "patch_merger.yaml"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def window_major(x: torch.Tensor, grid: tuple[int, int], m: int = 2) -> torch.Tensor:
    """Row-major patches ``[B, rows*cols, D]`` in Qwen2-VL processor order, built index by index:
    windows row-major, and within a window (0,0), (0,1), (1,0), (1,1)."""
    rows, cols = grid
    order = [
        (wr * m + i) * cols + (wc * m + j)
        for wr in range(rows // m)
        for wc in range(cols // m)
        for i in range(m)
        for j in range(m)
    ]
    return x[:, order]


# ---------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize(("grid", "tokens"), [((4, 4), 4), ((8, 6), 12)])
def test_shapes_and_output_length(grid, tokens):
    m = PatchMerger(vision_width=24, llm_hidden_size=40)
    assert m.output_length(grid) == tokens
    assert m(torch.randn(2, grid[0] * grid[1], 24), grid).shape == (2, tokens, 40)


def test_windows_are_gathered_from_a_row_major_grid():
    """Each output token sees exactly its own 2x2 window, in Qwen2-VL's order within the window."""
    m = PatchMerger(vision_width=3, llm_hidden_size=5).double()
    grid = (4, 6)
    x = torch.randn(1, 24, 3, dtype=torch.float64)
    with torch.no_grad():
        base = m(x, grid)
        x2 = x.clone()
        x2[0, 1 * 6 + 3] += 1.0  # patch (row 1, col 3): window (0, 1) = token 1
        changed = (m(x2, grid) - base).abs().amax(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1]
    # The mlp's input is the window's four ln_q'd patches, in order.
    seen = []
    hook = m.mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        m(x, grid)
    hook.remove()
    assert torch.equal(seen[0].reshape(1, 6, 4, 3), m.ln_q(window_major(x, grid)).reshape(1, 6, 4, 3))


def test_grid_not_divisible_is_an_error_naming_the_keys():
    m = PatchMerger(vision_width=8, llm_hidden_size=8)
    for grid in [(7, 7), (4, 5)]:
        with pytest.raises(ValueError, match=r"model\.vision\.image_size.*model\.adapter\.merge_size=2"):
            m.output_length(grid)
        with pytest.raises(ValueError, match=r"model\.vision\.image_size.*model\.adapter\.merge_size=2"):
            m(torch.randn(1, grid[0] * grid[1], 8), grid)
    assert PatchMerger(8, 8, merge_size=3).output_length((9, 6)) == 6
    with pytest.raises(ValueError, match="norm must be one of layernorm, rmsnorm"):
        PatchMerger(8, 8, norm="batchnorm")
    with pytest.raises(ValueError, match="merge_size"):
        PatchMerger(8, 8, merge_size=0)


# ---------------------------------------------------------------- parity with transformers


def _reference(norm: str):
    if norm == "layernorm":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Reference
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger as Reference
    return Reference


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("grid", [(4, 4), (8, 6)])
def test_matches_transformers_merger(norm, grid):
    context_dim, dim = 16, 24
    ref = _reference(norm)(dim=dim, context_dim=context_dim, spatial_merge_size=2)
    with torch.no_grad():  # every weight matters (norm affines, biases)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = PatchMerger(vision_width=context_dim, llm_hidden_size=dim, merge_size=2, norm=norm)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())

    x = torch.randn(3, grid[0] * grid[1], context_dim)  # row-major, as a timm ViT emits them
    with torch.no_grad():
        out = ours(x, grid)
        # The reference takes one image's patches window-contiguous, flattened over the batch.
        expected = ref(window_major(x, grid).reshape(-1, context_dim)).reshape(3, -1, dim)
    assert out.shape == expected.shape == (3, grid[0] * grid[1] // 4, dim)
    assert (out - expected).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- registry and config


def test_registered_and_default_config_matches_constructor():
    assert registry.get("adapter", "patch_merger") is PatchMerger
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg.pop("type") == "patch_merger"
    params = inspect.signature(PatchMerger.__init__).parameters
    assert cfg == {k: p.default for k, p in params.items() if k not in ("self", "vision_width", "llm_hidden_size")}


# ---------------------------------------------------------------- the ablation on the tiny model

ABLATION = {  # adapter -> (--options, image tokens for the tiny model's 8x8 patch grid)
    "qwen_resampler": ((), 36),
    "patch_merger": (("model.adapter.type=patch_merger",), 16),
    "mlp": (("model.adapter.type=mlp",), 64),
}
RECORD = {"messages": [
    {"role": "user", "content": "Picture 1: <img>images/train/000003.png</img>\nDescribe the image."},
    {"role": "assistant", "content": "A shape."},
]}


def train_step(cfg, model, proc, world) -> float:
    """One forward/backward of a collated one-image sample; the loss."""
    from lavis.datasets.collate import PadCollator

    encoder = ConversationEncoder(proc.tokenizer, model.num_image_tokens, cfg.model.system_message, 256)
    sample = SampleProcessor(encoder, proc.image)({**RECORD, "image_root": str(world)})
    batch = PadCollator(pad_id=proc.tokenizer.pad_id)([sample])
    assert int((batch["input_ids"] == proc.tokenizer.img_pad_id).sum()) == model.num_image_tokens
    model.train()
    out = model(**batch)
    loss = out.loss_sum / out.num_tokens
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("adapter", list(ABLATION))
def test_ablation_builds_and_trains(adapter, load_sft, small_world):
    options, tokens = ABLATION[adapter]
    cfg = load_sft(*options)
    assert cfg.model.adapter.type == adapter and cfg.model.vision.type == "timm_vit"
    model, proc = build_model(cfg.model)
    assert model.num_image_tokens == tokens
    assert model.encode_images(torch.randn(1, 3, 64, 64)).shape == (1, tokens, 128)
    loss = train_step(cfg, model, proc, small_world)
    assert math.isfinite(loss) and loss > 0
    grads = [p.grad for p in model.adapter.parameters()]
    assert all(g is not None for g in grads) and any(torch.count_nonzero(g) > 0 for g in grads)


def test_patch_merger_config_keys_and_odd_grid(load_sft):
    cfg = load_sft("model.adapter.type=patch_merger", "model.adapter.norm=rmsnorm")
    assert cfg.model.adapter.params == {"merge_size": 2, "norm": "rmsnorm", "pretrained": None}  # num_queries dropped
    cfg = load_sft("model.adapter.type=patch_merger", "model.adapter.merge_size=3")  # 8x8 patches
    model, _ = build_model(cfg.model)
    with pytest.raises(ValueError, match=r"8x8 .*model\.vision\.image_size.*merge_size=3"):
        _ = model.num_image_tokens


def test_frozen_patch_merger_gets_no_gradient(load_sft, small_world):
    cfg = load_sft("model.adapter.type=patch_merger", "model.freeze.adapter=frozen")
    model, proc = build_model(cfg.model)
    train_step(cfg, model, proc, small_world)
    assert not any(p.requires_grad or p.grad is not None for p in model.adapter.parameters())
    assert not model.adapter.training
    assert any(p.grad is not None for p in model.llm.parameters())
