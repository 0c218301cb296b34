"""Adapters: shapes, Qwen-VL's sin-cos positions and resampler forward, parameter names, configs."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lavis.common.registry import registry
from lavis.models.adapters.mlp import LinearAdapter, MLPAdapter
from lavis.models.adapters.qwen_resampler import QwenResampler, get_2d_sincos_pos_embed, resize_pos_embed

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models" / "adapters"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- shapes


def test_resampler_shapes_square_and_non_square_grid():
    m = QwenResampler(vision_width=32, llm_hidden_size=64, num_queries=16, num_heads=4)
    for grid in [(4, 4), (3, 5), (7, 2)]:
        x = torch.randn(2, grid[0] * grid[1], 32)
        assert m(x, grid).shape == (2, 16, 64)
        assert m.output_length(grid) == 16
    with pytest.raises(ValueError, match="patches"):
        m(torch.randn(2, 10, 32), (3, 5))


def test_resampler_kv_proj_identity_only_when_widths_equal():
    same = QwenResampler(vision_width=64, llm_hidden_size=64, num_queries=4)
    assert isinstance(same.kv_proj, nn.Identity)
    assert same(torch.randn(1, 9, 64), (3, 3)).shape == (1, 4, 64)
    diff = QwenResampler(vision_width=48, llm_hidden_size=64, num_queries=4)
    assert isinstance(diff.kv_proj, nn.Linear)
    assert diff.kv_proj.bias is None and diff.kv_proj.weight.shape == (64, 48)


def test_default_num_heads():
    assert QwenResampler(16, 64, num_queries=4).num_heads == 1  # max(1, 64 // 128)
    assert QwenResampler(16, 512, num_queries=4).num_heads == 4
    assert QwenResampler(16, 512, num_queries=4).attn.num_heads == 4


def test_mlp_and_linear_shapes_and_structure():
    x = torch.randn(2, 3 * 5, 24)
    mlp = MLPAdapter(vision_width=24, llm_hidden_size=40)
    assert mlp(x, (3, 5)).shape == (2, 15, 40) and mlp.output_length((3, 5)) == 15
    kinds = [type(layer) for layer in mlp.proj]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear]  # LLaVA-1.5 mlp2x_gelu
    assert mlp.proj[0].weight.shape == (40, 24) and mlp.proj[2].weight.shape == (40, 40)

    deep = MLPAdapter(24, 40, num_layers=3)
    assert [type(layer) for layer in deep.proj] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]

    lin = LinearAdapter(24, 40)
    assert [type(layer) for layer in lin.proj] == [nn.Linear]
    assert lin(x, (3, 5)).shape == (2, 15, 40) and lin.output_length((3, 5)) == 15
    assert torch.allclose(lin(x, (3, 5)), x @ lin.proj[0].weight.T + lin.proj[0].bias, atol=1e-6)

    with pytest.raises(ValueError, match="num_layers"):
        MLPAdapter(24, 40, num_layers=0)


# ---------------------------------------------------------------- sin-cos table


def test_sincos_table_2x2_by_hand():
    table = get_2d_sincos_pos_embed(8, 2)
    assert table.shape == (4, 8) and table.dtype == torch.float32
    # D=8: each coordinate gets D/2 = 4 channels, D/4 = 2 frequencies: 1 and 1/10000**(1/2) = 0.01.
    w0, w1 = 1.0, 0.01
    expected = []
    for r in range(2):  # positions are row-major
        for c in range(2):
            col_half = [math.sin(c * w0), math.sin(c * w1), math.cos(c * w0), math.cos(c * w1)]
            row_half = [math.sin(r * w0), math.sin(r * w1), math.cos(r * w0), math.cos(r * w1)]
            expected.append(col_half + row_half)
    assert torch.allclose(table, torch.tensor(expected), atol=1e-6)
    # Layout spelled out: position 1 is (row 0, col 1): the column half moves, the row half does not.
    assert table[1, 0] == pytest.approx(math.sin(1.0), abs=1e-6)
    assert table[1, 4] == pytest.approx(0.0, abs=1e-6) and table[1, 6] == pytest.approx(1.0, abs=1e-6)
    # Position 2 is (row 1, col 0): the reverse.
    assert table[2, 0] == pytest.approx(0.0, abs=1e-6) and table[2, 2] == pytest.approx(1.0, abs=1e-6)
    assert table[2, 4] == pytest.approx(math.sin(1.0), abs=1e-6)
    assert table[2, 6] == pytest.approx(math.cos(1.0), abs=1e-6)


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(6, 2)


# ---------------------------------------------------------------- key positions


def _bicubic(table: torch.Tensor, size: int, rows: int, cols: int) -> torch.Tensor:
    img = table.reshape(size, size, -1).permute(2, 0, 1).unsqueeze(0)  # [1, D, g, g]
    out = F.interpolate(img, size=(rows, cols), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(rows * cols, -1)


def test_key_positions_interpolated_to_patch_grid():
    m = QwenResampler(vision_width=32, llm_hidden_size=64, num_queries=256, num_heads=4)
    assert m.pos_embed.shape == (256, 64)
    used = []
    original = m.key_pos_embed
    m.key_pos_embed = lambda grid: used.append(original(grid)) or used[-1]  # spy on what forward uses

    out32 = m(torch.randn(2, 32 * 32, 32), (32, 32))
    assert out32.shape == (2, 256, 64)
    assert used[-1].shape == (1024, 64)
    assert torch.allclose(used[-1], _bicubic(m.pos_embed, 16, 32, 32), atol=1e-6)
    assert not torch.allclose(used[-1][:256], m.pos_embed, atol=1e-3)

    out16 = m(torch.randn(2, 16 * 16, 32), (16, 16))
    assert out16.shape == (2, 256, 64)
    assert torch.equal(used[-1], m.pos_embed)  # the table unchanged on its own grid

    # Non-square grid goes through the same bicubic resize.
    assert torch.allclose(resize_pos_embed(m.pos_embed, (8, 24)), _bicubic(m.pos_embed, 16, 8, 24), atol=1e-6)


def test_output_depends_on_grid():
    m = QwenResampler(vision_width=32, llm_hidden_size=64, num_queries=16, num_heads=4)
    x = torch.randn(2, 64, 32)
    a, b = m(x, (8, 8)), m(x, (4, 16))  # same features, laid out differently
    assert (a - b).abs().max() > 1e-3


def test_resampler_follows_input_dtype():
    m = QwenResampler(vision_width=32, llm_hidden_size=64, num_queries=16, num_heads=4).to(torch.bfloat16)
    out = m(torch.randn(1, 36, 32, dtype=torch.bfloat16), (6, 6))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 16, 64) and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- parameters and init


def test_parameter_names_and_buffer():
    m = QwenResampler(vision_width=32, llm_hidden_size=64, num_queries=16, num_heads=4)
    assert set(dict(m.named_parameters())) == {
        "kv_proj.weight",
        "ln_kv.weight",
        "ln_kv.bias",
        "query",
        "ln_q.weight",
        "ln_q.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_post.weight",
        "ln_post.bias",
        "proj",
    }
    assert set(dict(m.named_buffers())) == {"pos_embed"}
    assert "pos_embed" in m.state_dict() and not m.pos_embed.requires_grad
    assert m.proj.shape == (64, 64) and m.query.shape == (16, 64)

    # pos_embed stays out of training: no grad, while the query does get one.
    m(torch.randn(1, 9, 32), (3, 3)).sum().backward()
    assert m.query.grad is not None and m.pos_embed.grad is None


def test_init_statistics():
    m = QwenResampler(vision_width=256, llm_hidden_size=512, num_queries=256)
    assert m.query.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.kv_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.attn.out_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.proj.std().item() == pytest.approx(512**-0.5, rel=0.1)
    assert m.query.abs().max() <= 2.0  # truncated normal
    for bias in (m.attn.in_proj_bias, m.attn.out_proj.bias, m.ln_q.bias, m.ln_kv.bias, m.ln_post.bias):
        assert torch.count_nonzero(bias) == 0
    for ln in (m.ln_q, m.ln_kv, m.ln_post):
        assert torch.all(ln.weight == 1) and ln.eps == 1e-6


# ---------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="perfect square"):
        QwenResampler(32, 64, num_queries=10)
    with pytest.raises(ValueError, match="perfect square"):
        QwenResampler(32, 64, num_queries=0)
    with pytest.raises(ValueError, match="num_heads"):
        QwenResampler(32, 64, num_queries=16, num_heads=3)


# ---------------------------------------------------------------- equivalence with Qwen-VL


def _qwen_vl_forward(sd: dict, num_heads: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Qwen-VL's Resampler.forward + VisionTransformer's ln_post / proj, sequence-first, from weights."""
    dim = sd["query"].shape[1]

    def ln(t, prefix):
        return F.layer_norm(t, (dim,), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)

    pos_embed = sd["pos_embed"]
    src = int(math.sqrt(pos_embed.size(0)))
    if grid != (src, src):  # get_abs_pos
        key_pos = (
            F.interpolate(
                pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
                size=grid,
                mode="bicubic",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .flatten(0, 2)
            .to(pos_embed.dtype)
        )
    else:
        key_pos = pos_embed
    attn = nn.MultiheadAttention(dim, num_heads).to(x.dtype)  # sequence-first, as in Qwen-VL
    attn.load_state_dict({k[len("attn.") :]: v for k, v in sd.items() if k.startswith("attn.")})

    kv = x @ sd["kv_proj.weight"].T if "kv_proj.weight" in sd else x
    kv = ln(kv, "ln_kv").permute(1, 0, 2)  # NLD -> LND
    n = kv.shape[1]
    q = ln(sd["query"], "ln_q")
    out = attn(q.unsqueeze(1).repeat(1, n, 1) + pos_embed.unsqueeze(1), kv + key_pos.unsqueeze(1), kv)[0]
    out = out.permute(1, 0, 2)
    return ln(out, "ln_post") @ sd["proj"]


@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (3, 3)])
def test_matches_qwen_vl_forward(grid):
    m = QwenResampler(vision_width=24, llm_hidden_size=32, num_queries=16, num_heads=4).double()
    with torch.no_grad():  # make every weight matter (LayerNorm affines, biases)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, grid[0] * grid[1], 24, dtype=torch.float64)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ours = m(x, grid)
        ref = _qwen_vl_forward(sd, 4, x, grid)
    assert ours.shape == ref.shape == (3, 16, 32)
    assert torch.allclose(ours, ref, atol=1e-10)


# ---------------------------------------------------------------- registry and configs


def test_registered():
    entries = registry._entries["adapter"]
    assert entries["qwen_resampler"] is QwenResampler
    assert entries["mlp"] is MLPAdapter
    assert entries["linear"] is LinearAdapter


@pytest.mark.parametrize("name", ["qwen_resampler", "mlp", "linear"])
def test_default_config_matches_constructor(name):
    cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert cfg.pop("type") == name
    params = inspect.signature(registry._entries["adapter"][name].__init__).parameters
    user_defaults = {
        k: p.default for k, p in params.items() if k not in ("self", "vision_width", "llm_hidden_size")
    }
    assert cfg == user_defaults
