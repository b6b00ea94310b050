"""The transformer block shared by patch-mixer and backbone, and the final layer."""
from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention, SelfAttention
from .ffn import ExpertChoiceMoE, SwiGLU, round_up


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with per-sample (N, D) shift and scale broadcast over tokens; one fused pass
    over x (addcmul) instead of a product and a sum."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual: x + gate * out, with a per-sample (N, D) gate; one fused pass (addcmul)."""
    return torch.addcmul(x, gate.unsqueeze(1), out)


def attention_width(dim: int, mult: float, head_dim: int) -> int:
    """Self-attention width of a block: the block width at multiplier 1, else rounded up to 2 x head_dim."""
    return dim if mult == 1 else round_up(int(dim * mult), 2 * head_dim)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, ungated cross-attention to captions, then a dense or MoE feed-forward."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        head_dim: int,
        attn_mult: float = 1.0,
        ffn_mult: float = 4.0,
        moe: bool = False,
        num_experts: int = 8,
        capacity_factor: float = 2.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.attn = SelfAttention(dim, attention_width(dim, attn_mult, head_dim), head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.cross = CrossAttention(dim, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        if moe:  # MoE experts: two GELU matrices, hidden = width x multiplier rounded up to 256
            self.ffn = ExpertChoiceMoE(dim, round_up(int(dim * ffn_mult), 256), num_experts, capacity_factor)
        else:  # SwiGLU keeps the FLOPs of a 2-matrix FFN of width x multiplier with 2/3 of the hidden size
            self.ffn = SwiGLU(dim, round_up(int(2 * int(dim * ffn_mult) / 3), 256))
        self.adaLN = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = gated_residual(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))  # (N, T, D)
        x = x + self.cross(self.norm2(x), y)  # (N, T, D)
        return gated_residual(x, gate2, self.ffn(modulate(self.norm3(x), shift2, scale2)))  # (N, T, D)


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift and scale, then a linear map to p*p*C values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.adaLN = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # 2 x (N, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)
