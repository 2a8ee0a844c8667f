"""Transformer building blocks with the official VideoMAE parameter names (so checkpoints map 1:1).

Legend: ``B`` batch, ``N`` tokens, ``D`` width, ``H`` heads, ``Dh = D / H``; video ``[B, C, T, H_px, W_px]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

LN_EPS = 1e-6  # official VideoMAE: partial(nn.LayerNorm, eps=1e-6) everywhere


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed position table ``[1, num_positions, dim]`` (float32) equal to the official
    ``get_sinusoid_encoding_table``: angle ``pos / 10000^(2*(j//2)/dim)``, sin on even ``j``, cos on odd ``j``.
    Computed in float64 like the official numpy code, then rounded to float32."""
    if num_positions <= 0 or dim <= 0:
        raise ValueError(f"sinusoid_table needs positive sizes, got num_positions={num_positions}, dim={dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(
        torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim
    )
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)[None]


class PatchEmbed(nn.Module):
    """Tubelet embedding: Conv3d with kernel = stride = ``(tubelet, patch, patch)``; ``[B,C,T,H,W] -> [B,L,D]``
    with tokens ordered ``(t, h, w)``."""

    def __init__(self, *, in_chans: int, dim: int, patch_size: int, tubelet_size: int) -> None:
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.proj(video_BCTHW).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Official layout: one fused ``qkv`` weight ``[3D, D]`` without bias, plus learned ``q_bias`` and ``v_bias``
    (the key bias is fixed at zero — it would cancel in the softmax anyway)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x_BND, self.qkv.weight, bias)
        q_BHND, k_BHND, v_BHND = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out_BHND = F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND)
        return self.proj(rearrange(out_BHND, "b h n d -> b n (h d)"))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``, scaled by the keep probability), with the rate in a
    non-persistent buffer: torch.compile guards on a tensor's metadata, not its value, so blocks with
    different rates (0 .. drop_path_rate) run one compiled graph instead of recompiling per block (past
    dynamo's recompile limit of 8, a ViT-B with 12 blocks fails). State-dict keys are unchanged."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.register_buffer("rate", torch.tensor(float(rate)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """Linear ``fc1`` -> GELU -> linear ``fc2``, ``[..., D] -> [..., D]`` through ``hidden`` features: timm's
    ``Mlp`` without dropout (VideoMAE uses none), written out because importing timm imports torchvision."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self, dim: int, num_heads: int, *, mlp_hidden: int, qkv_bias: bool, drop_path: float | None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        # None: no drop path in the whole model (no RNG drawn); else a DropPath even at rate 0 (block 0), so
        # every block has the same structure for torch.compile
        self.drop_path = DropPath(drop_path) if drop_path is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.drop_path(self.attn(self.norm1(x_BND)))
        return x_BND + self.drop_path(self.mlp(self.norm2(x_BND)))


def make_blocks(
    *, dim: int, depth: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, drop_path_rate: float
) -> nn.ModuleList:
    """``depth`` blocks with drop-path rising linearly from 0 to ``drop_path_rate`` (official schedule)."""
    rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    if drop_path_rate == 0:
        rates = [None] * depth
    return nn.ModuleList(
        Block(dim, num_heads, mlp_hidden=mlp_hidden, qkv_bias=qkv_bias, drop_path=r) for r in rates
    )
