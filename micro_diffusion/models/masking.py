"""Random patch masking: which tokens of each sample the backbone keeps."""
from __future__ import annotations

import torch

from ..utils.seeds import draw


def num_kept(tokens: int, mask_ratio: float) -> int:
    """Tokens kept per sample at a mask ratio: int(T x (1 - r)) as the released network truncates it, at least one."""
    return max(1, int(tokens * (1 - mask_ratio)))


def draw_keep(
    batch: int, tokens: int, mask_ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, a uniform random subset of kept tokens: indices (N, K) ascending, mask (N, T) True = dropped."""
    scores = draw("rand", (batch, tokens), generator, device)  # (N, T)
    keep = scores.argsort(dim=1)[:, : num_kept(tokens, mask_ratio)].sort(dim=1).values  # (N, K)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device).scatter_(1, keep, False)  # (N, T)
    return keep, mask


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept tokens: (N, T, D), (N, K) -> (N, K, D)."""
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, keep: torch.Tensor, tokens: int, fill: torch.Tensor) -> torch.Tensor:
    """Kept tokens back at their positions, `fill` (D,) elsewhere: (N, K, D) -> (N, T, D)."""
    N, _, D = x.shape
    out = fill.to(x.dtype).expand(N, tokens, D).clone()  # (N, T, D)
    return out.scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), x)
