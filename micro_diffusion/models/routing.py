"""TREAD token routing (Krause et al. 2025): in training, a random share of the backbone's tokens skips a span of
blocks and rejoins after it with the values it had before the span, so every token stays in the loss."""
from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch

from ..utils.seeds import draw
from .masking import gather_tokens

Route = tuple[int, int, float]  # (first block, last block (inclusive), share of tokens routed around the span)


def num_routed(tokens: int, ratio: float) -> int:
    """Tokens routed around a span: int(T x ratio), as TREAD's router truncates it."""
    return int(tokens * ratio)


def _route(i: int, route: Any) -> Route:
    """One route as (int, int, float); a value of another shape or type raises naming it."""
    if not isinstance(route, Sequence) or isinstance(route, str) or len(route) != 3:
        raise ValueError(f"routes[{i}] {route!r}: expected (start, end, ratio)")
    start, end, ratio = route
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (start, end)):
        raise ValueError(f"routes[{i}] {route!r}: start and end must be integer block indices")
    if not isinstance(ratio, Real) or isinstance(ratio, bool):
        raise ValueError(f"routes[{i}] {route!r}: ratio must be a number")
    return int(start), int(end), float(ratio)


def check_routes(routes: Sequence[Any], depth: int) -> tuple[Route, ...]:
    """Routes as a tuple of (start, end, ratio) tuples (YAML and JSON give lists), each within the backbone's `depth`
    blocks, 0 < ratio < 1, and no two sharing a block; an error names the route."""
    if isinstance(routes, str) or not isinstance(routes, Sequence):
        raise ValueError(f"routes {routes!r}: expected a list of (start, end, ratio)")
    out = tuple(_route(i, r) for i, r in enumerate(routes))
    for i, (start, end, ratio) in enumerate(out):
        if not 0 <= start <= end < depth:
            raise ValueError(f"routes[{i}] {routes[i]!r}: needs 0 <= start <= end < depth ({depth})")
        if not 0 < ratio < 1:
            raise ValueError(f"routes[{i}] {routes[i]!r}: ratio must lie in (0, 1)")
    order = sorted(range(len(out)), key=lambda i: out[i][0])
    for a, b in zip(order[:-1], order[1:], strict=True):
        if out[b][0] <= out[a][1]:
            raise ValueError(f"routes[{a}] {routes[a]!r} and routes[{b}] {routes[b]!r} overlap (block {out[b][0]})")
    return out


def draw_route(batch: int, tokens: int, ratio: float, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample, the tokens that run through the span: the first T - int(T x ratio) of a uniform random permutation,
    as indices (N, T_span) in ascending order."""
    scores = draw("rand", (batch, tokens), generator, device)  # (N, T)
    return scores.argsort(dim=1)[:, : tokens - num_routed(tokens, ratio)].sort(dim=1).values  # (N, T_span)


def draw_spans(routes: Sequence[Route], batch: int, tokens: int, device: torch.device,
               generator: torch.Generator | None = None) -> dict[int, tuple[int, torch.Tensor]]:
    """Every route's draw, in the order the routes are given: first block -> (last block, indices (N, T_span))."""
    return {start: (end, draw_route(batch, tokens, ratio, device, generator)) for start, end, ratio in routes}


def start_route(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The tokens that run through the span: (N, T, D), (N, T_span) -> (N, T_span, D)."""
    return gather_tokens(x, idx)


def end_route(x: torch.Tensor, idx: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The span's output at its tokens' positions, the routed tokens as they were before the span:
    (N, T_span, D), (N, T_span), (N, T, D) -> (N, T, D); out of place, so `before` stays intact for autograd."""
    return before.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
