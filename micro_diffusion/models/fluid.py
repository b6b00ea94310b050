"""Fluid: autoregression over continuous tokens, in a random order (BERT-like) or in raster order (GPT-like).

Fan et al., "Fluid: Scaling Autoregressive Text-to-image Generative Models with Continuous Tokens" (2410.13863), built
on MAR (Li et al., 2406.11838). One transformer over all T tokens of the latent (not MAR's encoder/decoder split):
with text entering every block by cross-attention there is no class token to hold in buffer tokens, and one stack
runs both orders, differing only in the attention mask and the input. The caption tokens first pass a trainable
"text aligner". Each output z_i conditions the per-token DiffusionHead; its diffusion math is in diffusion/head.py,
training and sampling in diffusion/fluid.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .attention import CrossAttention, SelfAttention
from .embeddings import sincos_2d
from .fluid_head import DiffusionHead
from .patches import patch_grid, patchify
from .presets import configured

__all__ = ["FLUID_PRESETS", "AlignerBlock", "DiffusionHead", "Fluid", "FluidBlock", "FluidConfig", "create_fluid"]

ORDERS = ("random", "raster")


@dataclass(frozen=True)
class FluidConfig:
    """Every size and switch of a Fluid network; presets fill it, overrides change any field."""

    width: int  # transformer width D
    depth: int  # transformer blocks
    heads: int  # attention heads (head dim = width / heads)
    aligner_depth: int = 6  # text-aligner blocks over the caption tokens
    head_width: int = 1024  # diffusion head: MLP width
    head_depth: int = 3  # diffusion head: residual blocks
    order: str = "random"  # "random" (bidirectional, mask token) or "raster" (causal, start token)
    patch_size: int = 2
    in_channels: int = 4
    latent_size: int | tuple[int, int] = 32  # default (H, W) of the latent; positions are computed for any size
    caption_dim: int = 1024  # width of the text encoder's token embeddings
    mlp_ratio: float = 4.0
    diffusion_batch_mul: int = 4  # training: each masked token's z repeats this many times in the head's loss

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"unknown Fluid order {self.order!r}; known: {', '.join(ORDERS)}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of an even size")
        if self.width % 4:  # the 2-D sin-cos positions take a quarter of the channels per sin/cos and axis
            raise ValueError(f"width {self.width} must be a multiple of 4 for the 2-D sin-cos positions")
        if min(self.depth, self.head_depth, self.head_width, self.diffusion_batch_mul) < 1 or self.aligner_depth < 0:
            raise ValueError("depth, head_depth, head_width and diffusion_batch_mul must be >= 1, aligner_depth >= 0")

    def to_dict(self) -> dict:
        """Plain, JSON-ready copy (a (H, W) latent size as a list)."""
        out = asdict(self)
        if isinstance(out["latent_size"], tuple):
            out["latent_size"] = list(out["latent_size"])
        return out


def _cfg(width: int, depth: int, heads: int, **kw) -> FluidConfig:
    return FluidConfig(width=width, depth=depth, heads=heads, **kw)


# Fluid's Table (params / blocks / width / heads); text aligner 6 blocks; head 3 x 1024 (MAR's training default).
FLUID_PRESETS: dict[str, Callable[[], FluidConfig]] = {
    "Fluid_166M": lambda: _cfg(768, 12, 12),
    "Fluid_369M": lambda: _cfg(1024, 16, 16),
    "Fluid_665M": lambda: _cfg(1280, 20, 16),
    "Fluid_1B": lambda: _cfg(1536, 24, 16),
    "Fluid_3B": lambda: _cfg(2304, 32, 24),
    "Fluid_10B": lambda: _cfg(4096, 34, 64),
    "Fluid_Tiny": lambda: _cfg(128, 4, 4, aligner_depth=1, head_width=128, head_depth=2),  # CPU runs, the demo
    "Fluid_Micro": lambda: _cfg(32, 2, 2, aligner_depth=1, head_width=32, head_depth=1),  # unit tests
}


class Mlp(nn.Module):
    """Linear, GELU, Linear (with biases), as ViT's."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


class AlignerBlock(nn.Module):
    """Pre-norm self-attention and MLP over the caption tokens (one block of the text aligner)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, dim, dim // heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.attn(self.norm1(y))  # (N, L, D)
        return y + self.mlp(self.norm2(y))  # (N, L, D)


class FluidBlock(nn.Module):
    """Pre-norm self-attention (causal for raster order), cross-attention to the aligned text, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, dim, dim // heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, dim // heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, D)
        x = x + self.cross(self.norm2(x), text)  # (N, T, D)
        return x + self.mlp(self.norm3(x))  # (N, T, D)


class Fluid(nn.Module):
    """Text aligner, a transformer over the image tokens (random or raster order) and the per-token diffusion head."""

    block_types = (AlignerBlock, FluidBlock)  # the wrapping units of FSDP and activation checkpointing

    def __init__(self, cfg: FluidConfig):
        super().__init__()
        self.cfg, D = cfg, cfg.width
        self.in_channels, self.patch_size = cfg.in_channels, cfg.patch_size
        self.token_dim = cfg.in_channels * cfg.patch_size**2
        self.caption_proj = nn.Linear(cfg.caption_dim, D)
        self.aligner = nn.ModuleList(AlignerBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.aligner_depth))
        self.aligner_norm = nn.LayerNorm(D, eps=1e-6)
        self.token_embed = nn.Linear(self.token_dim, D)
        if cfg.order == "random":  # the embedding of every unknown position
            self.mask_token = nn.Parameter(torch.zeros(D))
        else:  # raster: the input at position 0, where no token precedes
            self.start_token = nn.Parameter(torch.zeros(D))
        causal = cfg.order == "raster"
        self.blocks = nn.ModuleList(FluidBlock(D, cfg.heads, cfg.mlp_ratio, causal) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = DiffusionHead(self.token_dim, cond_dim=D, width=cfg.head_width, depth=cfg.head_depth)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier-uniform linears with zero biases, LayerNorms at one/zero, the learned token N(0, 0.02);
        the head keeps its own init (zero adaLN and output layers)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("head."):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token if self.cfg.order == "random" else self.start_token, std=0.02)
        self.head.initialize_weights()

    def grid(self, latent_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid (H/p, W/p) of a latent size (default: the configured one)."""
        return patch_grid(self.cfg.latent_size if latent_size is None else latent_size, self.patch_size)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, token_dim), row-major: the exact inverse of models.patches.unpatchify."""
        return patchify(latents, self.patch_size)

    def pos_embed(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Computed 2-D sin-cos positions (T, D) of a patch grid; cached outside the state dict."""
        key = (*grid, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.cfg.width, *grid).to(device, dtype)
        return self._pos_cache[key]

    def encode_text(self, caption: torch.Tensor) -> torch.Tensor:
        """Caption tokens (N, L, caption_dim) -> aligned text (N, L, D): projection, aligner blocks, LayerNorm."""
        y = self.caption_proj(caption)  # (N, L, D)
        for block in self.aligner:
            y = block(y)  # (N, L, D)
        return self.aligner_norm(y)  # (N, L, D)

    def _inputs(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Embedded inputs (N, T, D): the mask token at unknown positions (random), or shifted right (raster)."""
        x = self.token_embed(tokens)  # (N, T, D)
        if self.cfg.order == "random":
            if mask is None or mask.shape != tokens.shape[:2]:
                raise ValueError(f"random order needs a (N, T) mask of {tuple(tokens.shape[:2])}, got "
                                 f"{None if mask is None else tuple(mask.shape)}")
            return torch.where(mask[..., None], self.mask_token.to(x.dtype), x)  # (N, T, D)
        start = self.start_token.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
        return torch.cat([start, x[:, :-1]], dim=1)  # (N, T, D): position i holds token i-1

    def _token_grid(self, tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
        """The patch grid of `tokens` tokens: the one given, else the configured one."""
        grid = self.grid() if grid is None else grid
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"{tokens} tokens do not fill the patch grid {grid}: pass the latent's grid=")
        return grid

    def decode(
        self, tokens: torch.Tensor, mask: torch.Tensor | None, text: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tokens (N, T, d), mask (N, T) True = unknown (random order; ignored in raster), text (N, L, D) ->
        z (N, T, D), the head's condition at every position. grid: the patch grid when not the configured one."""
        x = self._inputs(tokens, mask)  # (N, T, D)
        x = x + self.pos_embed(self._token_grid(tokens.shape[1], grid), x.device, x.dtype)  # (N, T, D)
        for block in self.blocks:
            x = block(x, text)  # (N, T, D)
        return self.norm(x)  # (N, T, D)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None, caption: torch.Tensor,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """decode(tokens, mask, encode_text(caption), grid): the head's conditions (N, T, D)."""
        return self.decode(tokens, mask, self.encode_text(caption), grid)  # (N, T, D)


def create_fluid(
    name: str, latent_size: int | tuple[int, int] = 32, in_channels: int = 4, caption_dim: int = 1024, **overrides
) -> Fluid:
    """Build a preset Fluid network.

    Args:
        name: a key of FLUID_PRESETS, e.g. "Fluid_369M".
        latent_size: latent side (int) or (H, W); positions are computed for any size at run time.
        in_channels: latent channels of the VAE (4 for SDXL's); tokens have in_channels x patch_size^2 values.
        caption_dim: width of the text encoder's token embeddings (1024 for DFN5B-CLIP-ViT-H-14).
        **overrides: any FluidConfig field, e.g. order="raster" or head_depth=6.
    """
    return Fluid(configured(FLUID_PRESETS, name, "Fluid", latent_size=latent_size, in_channels=in_channels,
                            caption_dim=caption_dim, **overrides))
