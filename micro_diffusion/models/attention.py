"""Attention: xformers or torch's scaled_dot_product_attention on CUDA; three plain products on CPU."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU extra; its kernels raise NotImplementedError on CPU, so it is used on CUDA tensors only
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the install
    xops = None

EXPLICIT_MAX_SCORES = 1024 * 1024  # CPU: query x key tokens up to which the scores are materialised
# The attention path forced by the context managers below: a module global, not a ContextVar, because torch.compile
# traces globals (guarding on their value) but breaks its graph at every ContextVar.get, once per attention call.
_forced: str | None = None  # None (by device), "plain" or "fused"


@contextmanager
def _force(path: str) -> Iterator[None]:
    global _forced
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def plain_attention() -> AbstractContextManager[None]:
    """Attention as three plain products on every device inside the block: forward-mode AD (torch.func.jvp) needs
    them, since the fused kernels (flash, memory-efficient, xformers) have no forward derivative."""
    return _force("plain")


def fused_attention() -> AbstractContextManager[None]:
    """torch's fused SDPA on every device inside the block: what a CUDA run keeps for backward (no score matrices),
    for the memory probe (cost/memory.py) on a CPU."""
    return _force("fused")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, H, T, d) queries and (N, H, L, d) keys and values: (N, H, T, d).

    causal: query i attends to keys <= i only (GPT-like; T == L)."""
    if _forced == "plain":
        return _plain(q, k, v, causal)
    if _forced == "fused":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if q.is_cuda:
        if xops is not None:
            bias = xops.LowerTriangularMask() if causal else None
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (N, T, H, d): xformers' layout
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)  # (N, H, T, d)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if q.shape[-2] * k.shape[-2] > EXPLICIT_MAX_SCORES:  # long sequences: the fused kernel's memory is O(T), not O(T L)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # On CPU, torch 2.7's fused SDPA kernel runs forward+backward 2-6x slower than these three ops at our sizes
    # (a few hundred tokens); bf16 softmax still computes in fp32 inside. tests/test_equivalence.py compares them.
    return _plain(q, k, v, causal)


def _plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, H, T, L)
    if causal:  # -inf above the diagonal: query i sees keys 0..i
        T, L = scores.shape[-2:]
        future = torch.ones(T, L, dtype=torch.bool, device=scores.device).triu(1)  # (T, L)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def qk_norm(width: int) -> nn.LayerNorm:
    """LayerNorm without parameters over the whole attention width (all heads together), as the released network."""
    return nn.LayerNorm(width, eps=1e-6, elementwise_affine=False, bias=False)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, T, H*d) -> (N, H, T, d)."""
    N, T, _ = x.shape
    return x.view(N, T, heads, -1).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention whose inner width may differ from the block width (layer-wise scaling).

    q and k are normalised over the full attention width before the split into heads (the released network's
    q/k LayerNorms); the normalised values return to v's dtype, as bf16 autocast would run the norm in fp32.
    causal=True lets token i attend to tokens <= i only (the raster-order Fluid).
    """

    def __init__(self, dim: int, attn_dim: int, head_dim: int, causal: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.causal = attn_dim // head_dim, head_dim, causal
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=False)  # one fused projection: [q | k | v]
        self.proj = nn.Linear(attn_dim, dim, bias=False)
        self.q_norm, self.k_norm = qk_norm(attn_dim), qk_norm(attn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (N, T, A)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # (N, T, A) each
        out = attention(*(split_heads(t, self.heads) for t in (q, k, v)), causal=self.causal)  # (N, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(N, T, -1))  # (N, T, D)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to caption tokens, at the full block width, q and k normalised."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = qk_norm(dim), qk_norm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        k, v = self.kv(y).chunk(2, dim=-1)  # 2 x (N, L, D): [k | v]
        q, k = self.q_norm(self.q(x)).to(v.dtype), self.k_norm(k).to(v.dtype)  # (N, T, D), (N, L, D)
        out = attention(*(split_heads(t, self.heads) for t in (q, k, v)))  # (N, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(N, T, -1))  # (N, T, D)
