"""Quality against sampling cost (Mei et al., arXiv 2404.01367): best-guidance envelopes and their comparison.

A sweep point is a dict with `sampler`, `steps`, `guidance`, `flops_per_image` and the metrics `fid` (lower is better)
and `geneval` ({"overall": ...}, higher is better). A size's envelope for one sampler keeps, at each step count, the
point of the best guidance scale (the paper's Figure 9); envelopes of several sizes are compared at common budgets,
the sampling FLOPs per image every one of them covers, by linear interpolation in log-FLOPs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Point = dict[str, Any]
Curve = tuple[np.ndarray, np.ndarray]  # (flops per image, metric value), sorted by flops


def value(point: Point, metric: str) -> float:
    """A point's metric: fid, or the GenEval-style overall for geneval."""
    if metric == "fid":
        return float(point["fid"])
    if metric == "geneval":
        return float(point["geneval"]["overall"])
    raise ValueError(f"unknown sweep metric {metric!r} (fid or geneval)")


def better(metric: str, a: float, b: float) -> bool:
    """Whether a is strictly better than b on the metric."""
    return a > b if metric == "geneval" else a < b


def best_guidance(points: Sequence[Point], metric: str, sampler: str) -> list[Point]:
    """For each step count of a sampler, the point of the best guidance scale, in increasing steps."""
    best: dict[int, Point] = {}
    for p in points:
        if p["sampler"] != sampler:
            continue
        held = best.get(p["steps"])
        if held is None or better(metric, value(p, metric), value(held, metric)):
            best[p["steps"]] = p
    return [best[s] for s in sorted(best)]


def envelope(points: Sequence[Point], metric: str, sampler: str) -> Curve:
    """The best-guidance curve of a sampler: (FLOPs per image, metric) sorted by FLOPs."""
    chosen = sorted(best_guidance(points, metric, sampler), key=lambda p: p["flops_per_image"])
    if not chosen:
        raise ValueError(f"no sweep point uses sampler {sampler!r}")
    return (np.array([p["flops_per_image"] for p in chosen], dtype=float),
            np.array([value(p, metric) for p in chosen], dtype=float))


def interpolate(curve: Curve, budgets: float | Sequence[float]) -> np.ndarray:
    """The curve's metric at the given FLOPs, linear in log-FLOPs; nan outside the FLOPs it covers."""
    flops, values = curve
    at = np.log(np.atleast_1d(np.asarray(budgets, dtype=float)))
    out = np.interp(at, np.log(flops), values)
    out[(at < math.log(flops[0]) - 1e-12) | (at > math.log(flops[-1]) + 1e-12)] = np.nan
    return out


def common_range(curves: Sequence[Curve]) -> tuple[float, float] | None:
    """The lowest and highest budget every curve covers (None when they share none)."""
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    return (float(lo), float(hi)) if lo <= hi else None


def crossover(small: Curve, large: Curve, metric: str, points: int = 200) -> float | None:
    """The lowest common budget from which the large model is at least as good as the small one up to the highest
    common budget, on a log grid; None when it never is (or the curves share no budget)."""
    span = common_range([small, large])
    if span is None:
        return None
    grid = np.geomspace(span[0], span[1], points) if span[1] > span[0] else np.array([span[0]])
    s, g = interpolate(small, grid), interpolate(large, grid)
    wins = (g <= s) if metric == "fid" else (g >= s)
    if not wins[-1]:
        return None
    losing = np.flatnonzero(~wins)
    return float(grid[losing[-1] + 1] if losing.size else grid[0])
