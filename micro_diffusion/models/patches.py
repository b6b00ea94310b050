"""The patch layout, in one place: the patch grid of a latent, tokens back to a latent, and patch masks as pixels.

Tokens are row-major over the (H/p, W/p) grid (PatchEmbed's flattened convolution output). Every other part of the
project (positions, masking, the loss weights, FLOP counts) asks this module instead of rebuilding the grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.sizes import as_hw


def patch_grid(latent_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(H/p, W/p) of a latent; an error naming both when a side is not a multiple of the patch size."""
    h, w = as_hw(latent_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent size {(h, w)} is not a multiple of the patch size {patch_size}")
    return h // patch_size, w // patch_size


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) latent -> (N, T, p*p*C) tokens, row-major over the grid: the exact inverse of unpatchify."""
    N, C, H, W = latents.shape
    (gh, gw), p = patch_grid((H, W), patch_size), patch_size
    x = latents.reshape(N, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
    return x.reshape(N, gh * gw, p * p * C)  # (N, T, p*p*C)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) tokens, row-major over the grid -> (N, C, H, W) latent."""
    N, (gh, gw), p = tokens.shape[0], grid, patch_size
    x = tokens.reshape(N, gh, gw, p, p, channels)  # (N, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(N, channels, gh * p, gw * p)  # (N, C, H, W)


def keep_pixels(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, T) patch mask (True = dropped) -> (N, 1, H, W) float weight, 1 on the pixels of kept patches."""
    kept = (~mask).reshape(mask.shape[0], 1, *grid).float()  # (N, 1, h, w)
    return F.interpolate(kept, scale_factor=patch_size, mode="nearest")  # (N, 1, H, W)
