"""Input embeddings: patches, 2D sin-cos positions, noise level and captions."""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import SelfAttention
from .ffn import SwiGLU, round_up


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of positions (M,) into (M, dim), as in the transformer paper."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()  # (M, dim)


def sincos_2d(dim: int, grid_h: int, grid_w: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """Row-major (grid_h * grid_w, dim) 2D sin-cos table: the first half of the channels encodes the column index,
    the second half the row index (the released network's layout), each index divided by interpolation_scale."""
    ys = torch.arange(grid_h, dtype=torch.float64) / interpolation_scale
    xs = torch.arange(grid_w, dtype=torch.float64) / interpolation_scale
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.cat([sincos_1d(dim // 2, xx.flatten()), sincos_1d(dim // 2, yy.flatten())], dim=1)  # (h*w, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the latent, linearly embedded: (N, C, H, W) -> (N, T, D)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), row-major over the patch grid


class NoiseEmbed(nn.Module):
    """Sin-cos features of c_noise itself (cosines first, max period 10000), then Linear, GELU(tanh), Linear:
    (N,) -> (N, D). As the released network: c_noise is not scaled (ln(sigma)/4 spans about [-1.6, 1.1])."""

    def __init__(self, dim: int, freq_dim: int = 512):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half, dtype = self.freq_dim // 2, torch.promote_types(c_noise.dtype, torch.float32)  # never below fp32
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device, dtype=dtype) / half)
        args = c_noise.to(dtype)[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))  # (N, D)


class CaptionBlock(nn.Module):
    """One pre-norm transformer block over caption tokens (self-attention and SwiGLU), no conditioning."""

    def __init__(self, dim: int, head_dim: int, ffn_mult: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.attn = SelfAttention(dim, dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.ffn = SwiGLU(dim, round_up(int(2 * int(dim * ffn_mult) / 3), 256))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.attn(self.norm1(y))  # (N, L, D)
        return y + self.ffn(self.norm2(y))  # (N, L, D)


def _mlp(d_in: int, dim: int) -> nn.Sequential:
    """Linear (bias), GELU(tanh), LayerNorm without bias, Linear (bias)."""
    return nn.Sequential(nn.Linear(d_in, dim), nn.GELU(approximate="tanh"), nn.LayerNorm(dim, eps=1e-6, bias=False),
                         nn.Linear(dim, dim))


class CaptionEmbed(nn.Module):
    """Caption tokens (N, L, caption_dim) -> projected tokens (N, L, D) and a pooled vector (N, D).

    Projection and pooled MLP are both Linear, GELU(tanh), LayerNorm (no bias), Linear, as in the released network.
    """

    def __init__(self, caption_dim: int, dim: int, head_dim: int):
        super().__init__()
        self.proj = _mlp(caption_dim, dim)
        self.block = CaptionBlock(dim, head_dim)
        self.pool = _mlp(dim, dim)

    def forward(self, caption_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.block(self.proj(caption_tokens))  # (N, L, D)
        return y, self.pool(y.mean(dim=1))  # (N, L, D), (N, D)
