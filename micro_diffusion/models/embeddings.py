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
    """Row-major (grid_h * grid_w, dim) 2D sin-cos table; half the channels encode rows, half columns."""
    ys = torch.arange(grid_h, dtype=torch.float64) / interpolation_scale
    xs = torch.arange(grid_w, dtype=torch.float64) / interpolation_scale
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.cat([sincos_1d(dim // 2, yy.flatten()), sincos_1d(dim // 2, xx.flatten())], dim=1)  # (h*w, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the latent, linearly embedded: (N, C, H, W) -> (N, T, D)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), row-major over the patch grid


class NoiseEmbed(nn.Module):
    """Sinusoidal features of the noise conditioning c_noise, then an MLP: (N,) -> (N, D)."""

    def __init__(self, dim: int, freq_dim: int = 512, scale: float = 1000.0):
        super().__init__()
        # c_noise = ln(sigma)/4 spans about [-1.6, 1.1]; scaling it spreads it over the sinusoid's frequency range
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half, dtype = self.freq_dim // 2, torch.promote_types(c_noise.dtype, torch.float32)  # never below fp32
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device, dtype=dtype) / half)
        args = self.scale * c_noise.to(dtype)[:, None] * freqs[None]  # (N, half)
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


class CaptionEmbed(nn.Module):
    """Caption tokens (N, L, caption_dim) -> projected tokens (N, L, D) and a pooled vector (N, D)."""

    def __init__(self, caption_dim: int, dim: int, head_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(caption_dim, dim), nn.GELU(approximate="tanh"), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim)
        )
        self.block = CaptionBlock(dim, head_dim)
        self.pool = nn.Sequential(
            nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-6), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )

    def forward(self, caption_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.block(self.proj(caption_tokens))  # (N, L, D)
        return y, self.pool(y.mean(dim=1))  # (N, L, D), (N, D)
