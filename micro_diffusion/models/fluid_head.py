"""The per-token diffusion head of MAR/Fluid ("Diffusion Loss"): a small residual MLP with adaLN conditioning.

It maps a noisy token x_t, its integer diffusion step t and the transformer's output z at that position to the
epsilon prediction and the learned-range variance values. Module names and shapes follow MAR's SimpleMLPAdaLN
(models/diffloss.py), so its weights load with strict=True; the diffusion math lives in diffusion/head.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn

TIME_FEATURES = 256  # sin-cos features of the integer step
MAX_PERIOD = 10000


def step_features(t: torch.Tensor, dim: int = TIME_FEATURES, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """(N,) integer steps -> (N, dim) float32 features: cosines first, then sines, frequencies max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)  # (N, dim)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN on per-row vectors: x * (1 + scale) + shift, all (N, W)."""
    return x * (1 + scale) + shift


class StepEmbed(nn.Module):
    """Integer step -> (N, W): sin-cos features, then Linear, SiLU, Linear."""

    def __init__(self, width: int, features: int = TIME_FEATURES):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(step_features(t, self.features).to(self.mlp[0].weight.dtype))  # (N, W)


class HeadBlock(nn.Module):
    """LayerNorm, adaLN shift/scale, Linear-SiLU-Linear, gated residual; shift/scale/gate from the condition y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # 3 x (N, W)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))  # (N, W)


class HeadFinalLayer(nn.Module):
    """DiT-style output: LayerNorm without affine, adaLN shift/scale, Linear to the output values."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # 2 x (N, W)
        return self.linear(_modulate(self.norm_final(x), shift, scale))  # (N, out)


class DiffusionHead(nn.Module):
    """Per-token denoiser: (x_t (N, d), t (N,) integer steps, z (N, cond_dim)) -> (N, 2d): epsilon, variance values.

    Args:
        token_dim: d, the channels of one continuous token (in_channels x patch_size^2).
        cond_dim: width of the condition z (the transformer's width).
        width: the MLP's width.
        depth: residual blocks.
    """

    def __init__(self, token_dim: int = 16, cond_dim: int = 1024, width: int = 1024, depth: int = 3):
        super().__init__()
        self.token_dim, self.cond_dim, self.width, self.depth = token_dim, cond_dim, width, depth
        self.time_embed = StepEmbed(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(HeadBlock(width) for _ in range(depth))
        self.final_layer = HeadFinalLayer(width, 2 * token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier-uniform linears with zero biases, step-MLP weights N(0, 0.02), adaLN and output zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(c)  # (N, W): the condition of every block
        h = self.input_proj(x)  # (N, W)
        for block in self.res_blocks:
            h = block(h, y)  # (N, W)
        return self.final_layer(h, y)  # (N, 2d): [epsilon | variance values]
