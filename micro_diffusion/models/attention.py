"""Attention: torch's scaled_dot_product_attention, or xformers on CUDA when it is installed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU extra; its kernels raise NotImplementedError on CPU, so it is used on CUDA tensors only
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the install
    xops = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over (N, H, T, d) tensors, returning (N, H, T, d)."""
    if xops is not None and q.is_cuda:
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (N, T, H, d)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


class SelfAttention(nn.Module):
    """Multi-head self-attention whose inner width may differ from the block width (layer-wise scaling)."""

    def __init__(self, dim: int, attn_dim: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = attn_dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=False)  # one fused projection
        self.proj = nn.Linear(attn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, d)
        out = attention(q, k, v)  # (N, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(N, T, -1))  # (N, T, D)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to caption tokens, at the full block width."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        L = y.shape[1]
        q = self.q(x).view(N, T, self.heads, self.head_dim).transpose(1, 2)  # (N, H, T, d)
        k, v = self.kv(y).view(N, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 2 x (N, H, L, d)
        out = attention(q, k, v)  # (N, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(N, T, -1))  # (N, T, D)
