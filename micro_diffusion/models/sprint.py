"""SPRINT sparse-dense residual fusion (Park et al. 2025): the backbone's first blocks run on every token (dense
encoder), the middle blocks on the kept tokens (sparse), then a fusion joins the sparse output with the dense one on
every token before the last blocks (dense decoder)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .masking import scatter_tokens

FUSIONS = ("concat_linear",)  # SPRINT's `residual_type`; the only fusion built here


def sprint_on(encoder_depth: int, decoder_depth: int) -> bool:
    """Whether a config asks for SPRINT: any dense encoder or decoder block."""
    return encoder_depth > 0 or decoder_depth > 0


def check_sprint(encoder_depth: Any, decoder_depth: Any, fusion: Any, depth: int, patch_mixer_depth: int,
                 routes: Sequence[Any]) -> None:
    """SPRINT's split and fusion are buildable on this backbone; an error names the field."""
    for name, value in (("sprint_encoder_depth", encoder_depth), ("sprint_decoder_depth", decoder_depth)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"sprint_fusion {fusion!r} is not built; known: {', '.join(FUSIONS)}")
    if not sprint_on(encoder_depth, decoder_depth):
        return
    if encoder_depth + decoder_depth >= depth:
        raise ValueError(f"sprint_encoder_depth + sprint_decoder_depth ({encoder_depth} + {decoder_depth}) must be "
                         f"< depth ({depth}), leaving at least one sparse middle block")
    if patch_mixer_depth:
        raise ValueError(f"SPRINT (sprint_encoder_depth / sprint_decoder_depth) needs patch_mixer_depth 0, got "
                         f"{patch_mixer_depth}")
    if routes:
        raise ValueError("SPRINT (sprint_encoder_depth / sprint_decoder_depth) does not combine with routes")


class ConcatLinearFusion(nn.Module):
    """The sparse output back at every position (dropped ones get a fixed token), concatenated with the dense encoder
    output along channels, then Linear(2D -> D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)  # weight (D, 2D): input channels [sparse, dense]
        # SPRINT fills dropped positions with a token drawn once (std 0.02) and never trained: a buffer, not a parameter
        self.register_buffer("fill", torch.zeros(dim))

    def reset_fill(self) -> None:
        """Draw the fill token as SPRINT initialises its mask token: normal, std 0.02."""
        nn.init.normal_(self.fill, std=0.02)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """(N, K, D) sparse, (N, T, D) dense, (N, K) kept indices or None (nothing dropped) -> (N, T, D)."""
        if keep is not None:
            sparse = scatter_tokens(sparse, keep, dense.shape[1], self.fill)  # (N, T, D)
        return self.linear(torch.cat([sparse, dense], dim=-1))  # (N, T, 2D) -> (N, T, D)
