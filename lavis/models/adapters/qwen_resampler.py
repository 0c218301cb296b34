"""Qwen-VL's position-aware vision-language adapter.

Mirrors Qwen-VL's ``visual.py``: the ``Resampler`` (``attn_pool``) plus the ``ln_post`` / ``proj``
that follow it in ``VisionTransformer``, so Qwen-VL weights map onto it by renaming
``transformer.visual.attn_pool.<name>`` -> ``<name>`` and ``transformer.visual.{ln_post,proj}``
-> ``{ln_post,proj}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lavis.common.registry import registry
from lavis.models.adapters.grids import Grid, as_thw, is_native, split_images


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE / Qwen-VL 2D sin-cos table, ``[grid_size**2, embed_dim]`` float32, positions row-major.

    Channels ``[0, D/2)`` encode the column (w) coordinate and ``[D/2, D)`` the row (h)
    coordinate; each half is ``sin(pos * omega)`` then ``cos(pos * omega)`` with
    ``omega_k = 1 / 10000 ** (k / (D/4))``.  (MAE's ``np.meshgrid(grid_w, grid_h)``, "w goes first".)
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # [g*g, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_pos_embed(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square ``[g*g, D]`` position table to ``[rows*cols, D]`` for ``grid = (rows, cols)``.

    Qwen-VL's ``get_abs_pos`` generalised to non-square grids: bicubic, ``align_corners=False``,
    computed in float32 and returned in ``table``'s dtype; the table itself when the grid is ``(g, g)``.
    """
    size = math.isqrt(table.shape[0])
    if size * size != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not a square grid")
    rows, cols = grid
    if (rows, cols) == (size, size):
        return table
    square = table.float().reshape(1, size, size, -1).permute(0, 3, 1, 2)  # [1, D, g, g]
    resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(table.dtype)


@registry.register("adapter", "qwen_resampler")
class QwenResampler(nn.Module):
    """One cross-attention layer from ``num_queries`` learned queries to the patch features.

    Queries and keys carry 2D sin-cos positions (the keys' table is resized to the patch grid),
    values carry none; the result goes through ``ln_post`` and ``x @ proj``.  Output length is
    ``num_queries`` whatever the image grid.
    """

    def __init__(
        self,
        vision_width: int,
        llm_hidden_size: int,
        num_queries: int = 256,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        grid_size = math.isqrt(num_queries) if num_queries > 0 else 0
        if grid_size < 1 or grid_size * grid_size != num_queries:
            raise ValueError(f"qwen_resampler: num_queries must be a perfect square (e.g. 256), got {num_queries}")
        embed_dim = llm_hidden_size
        if num_heads is None:
            num_heads = max(1, embed_dim // 128)
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"qwen_resampler: num_heads={num_heads} must be >= 1 and divide the embedding size "
                f"(llm_hidden_size={embed_dim})"
            )
        self.num_queries = num_queries
        self.grid_size = grid_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads

        # A buffer, not a parameter: saved in state_dict (as Qwen-VL's frozen pos_embed) but never trained.
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(embed_dim, grid_size), persistent=True)
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(vision_width, embed_dim, bias=False) if vision_width != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # Qwen-VL's Resampler._init_weights; attn.in_proj_weight keeps MultiheadAttention's own
        # xavier init there too (it is a bare Parameter, not an nn.Linear).
        nn.init.trunc_normal_(self.query, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # includes attn.out_proj
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def output_length(self, grid: Grid) -> int:
        """Tokens per image: always ``num_queries``."""
        return self.num_queries

    def token_grid(self, grid: Grid) -> None:
        """None: the queries are a set, not a grid of the image (no 3-D positions for them)."""
        return None

    def key_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Key position table ``[rows*cols, D]``: ``pos_embed`` resized to the patch grid."""
        return resize_pos_embed(self.pos_embed, grid)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``x``: ``[B, rows*cols, vision_width]`` -> ``[B, num_queries, llm_hidden_size]``. At native
        resolution (``x`` ``[patches, vision_width]``, row-major per image, ``grid`` ``[n, 3]``) each image
        is resampled at its own grid -> ``[n, num_queries, llm_hidden_size]``."""
        if is_native(grid):
            outs = []
            for feats, thw in zip(split_images(x, grid), grid.tolist()):
                t, h, w = as_thw(thw)
                if t != 1:
                    raise ValueError(f"qwen_resampler: resamples single frames; got an input of {t} frames")
                outs.append(self(feats.unsqueeze(0), (h, w)))
            return torch.cat(outs) if outs else x.new_zeros(0, self.num_queries, self.proj.shape[1])
        rows, cols = grid
        if x.shape[1] != rows * cols:
            raise ValueError(f"qwen_resampler: got {x.shape[1]} patches for a {rows}x{cols} grid")
        kv = self.ln_kv(self.kv_proj(x))
        keys = kv + self.key_pos_embed(grid).to(kv.dtype)
        query = self.ln_q(self.query) + self.pos_embed.to(self.query.dtype)
        query = query.unsqueeze(0).expand(x.shape[0], -1, -1).to(kv.dtype)
        out = self.attn(query, keys, kv, need_weights=False)[0]
        return self.ln_post(out) @ self.proj
