"""Feed-forward layers: a SwiGLU dense FFN and an expert-choice mixture of experts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x."""
    return int(math.ceil(x / multiple) * multiple)


class SwiGLU(nn.Module):
    """Gated FFN: w_out(silu(x W_gate) * (x W_up)); gate and up projections fused in one matrix [gate; up]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)  # 2 x (N, T, hidden)
        return self.w_out(F.silu(gate) * up)  # (N, T, D)


class ExpertChoiceMoE(nn.Module):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-`capacity` tokens of each sample.

    Dispatch selects token rows by index and combines with index_add, so memory is O(N x E x C x D);
    no one-hot (N, E, C, T) dispatch tensors are built.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 8, capacity_factor: float = 2.0):
        super().__init__()
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def capacity(self, tokens: int) -> int:
        """Tokens each expert takes from a sample of `tokens` tokens: int(factor x T / E), as the released network
        truncates it (at least one, at most T)."""
        return max(1, min(tokens, int(self.capacity_factor * tokens / self.num_experts)))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and, per expert, its top-capacity tokens: gates and indices, each (N, E, C)."""
        logits = self.router(x)  # (N, T, E)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # over experts, >= fp32
        return probs.transpose(1, 2).topk(self.capacity(x.shape[1]), dim=-1)  # (N, E, C) each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        E, C = self.num_experts, self.capacity(T)
        gates, idx = self.route(x)  # (N, E, C): each expert's chosen tokens and their router weights
        # rows of the flattened (N*T, D) input, expert-major: one index_select / index_add_ over 2-D rows is cheaper
        # than gather / scatter with (N, E*C, D) expanded indices plus the transposes between layouts
        rows = (idx + T * torch.arange(N, device=x.device).view(N, 1, 1)).transpose(0, 1).reshape(-1)  # (E*N*C,)
        h = x.reshape(N * T, D).index_select(0, rows).view(E, N * C, D)  # (E, N*C, D)
        h = F.gelu(torch.bmm(h, self.w_in))  # (E, N*C, hidden): exact GELU, as the released experts
        h = torch.bmm(h, self.w_out)  # (E, N*C, D)
        h = h * gates.transpose(0, 1).reshape(E, N * C, 1).to(h.dtype)  # weighted by the router
        out = torch.zeros(N * T, D, dtype=h.dtype, device=x.device)
        return out.index_add_(0, rows, h.reshape(E * N * C, D)).view(N, T, D)  # (N, T, D)
