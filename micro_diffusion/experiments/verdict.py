"""Claims checked against the numbers: the verdict rule of the experiment runner, on means and standard errors.

For a metric where lower is better (validation loss, FID) the gap of "a beats b" is mean(b) - mean(a); where higher is
better (the GenEval-style overall) it is mean(a) - mean(b): a positive gap always favours a. se is the standard error
of the difference of the two means, sqrt(s_a^2 / n_a + s_b^2 / n_b) with sample variances (n - 1).
- a beats b: reproduced when gap > 2 se, not reproduced when gap < -2 se, inconclusive otherwise.
- a within b: reproduced when |gap| <= 2 se and |gap| <= 5% of b's mean, not reproduced when |gap| > 2 se,
  inconclusive otherwise.
With one seed a variant there is no standard error: every verdict is then inconclusive.

A convergence speed-up ("a speedup b, factor f": a reaches b's final value with at most 1/f of b's training FLOPs):
the target is the mean over b's seeds of b's final value. Per seed of a, the FLOPs at which a's curve first reaches
the target, interpolated linearly in log FLOPs between the evaluation point before and the first one that reaches
it (the first point itself when it already does); that seed's speed-up is b's training FLOPs over those. On the
seeds' log speed-ups (mean m, standard error se): reproduced when every seed reaches the target and
m - 2 se > log f; not reproduced when some seed never reaches it, or m + 2 se < log f; inconclusive otherwise, and
with one seed that reaches it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

LOWER_IS_BETTER = {"val_loss": True, "fid": True, "geneval": False}
WITHIN_SHARE = 0.05


def mean_and_var(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample variance (nan for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return mean, var


def verdict(kind: str, metric: str, a: Sequence[float], b: Sequence[float]) -> dict:
    """The claim's means, gap (positive favours a), standard error and verdict."""
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"unknown claim metric {metric!r} (known: {', '.join(LOWER_IS_BETTER)})")
    (ma, va), (mb, vb) = mean_and_var(a), mean_and_var(b)
    gap = mb - ma if LOWER_IS_BETTER[metric] else ma - mb
    se = math.sqrt(va / len(a) + vb / len(b)) if len(a) > 1 and len(b) > 1 else math.nan
    if math.isnan(se):
        result = "inconclusive"
    elif kind == "beats":
        result = "reproduced" if gap > 2 * se else "not reproduced" if gap < -2 * se else "inconclusive"
    elif kind == "within":
        close = abs(gap) <= 2 * se and abs(gap) <= WITHIN_SHARE * abs(mb)
        result = "reproduced" if close else "not reproduced" if abs(gap) > 2 * se else "inconclusive"
    else:
        raise ValueError(f"unknown claim kind {kind!r} (beats or within)")
    return {"a_mean": ma, "b_mean": mb, "gap": gap, "se": se, "verdict": result}


def reach_flops(flops: Sequence[float], values: Sequence[float], target: float, lower_is_better: bool) -> float | None:
    """FLOPs at which a curve first reaches target, linear in log FLOPs between evaluation points; None: never."""
    for i, (f, v) in enumerate(zip(flops, values, strict=True)):
        if (v <= target) if lower_is_better else (v >= target):
            if i == 0:
                return float(f)
            f0, v0 = flops[i - 1], values[i - 1]
            share = (target - v0) / (v - v0)  # where between the two points the straight line crosses the target
            return float(math.exp(math.log(f0) + share * (math.log(f) - math.log(f0))))
    return None


def speedup_verdict(metric: str, curves: Sequence[tuple[Sequence[float], Sequence[float]]], b_finals: Sequence[float],
                    b_flops: float, factor: float) -> dict:
    """The speed-up claim's geometric-mean speed-up (a_mean), required factor (b_mean), gap in log speed-up, its
    standard error, each seed's FLOPs to reach the target and speed-up (None: never reached) and verdict; curves are
    a's (flops, values) a seed."""
    target = sum(b_finals) / len(b_finals)
    reached = [reach_flops(f, v, target, LOWER_IS_BETTER[metric]) for f, v in curves]
    speedups = [None if r is None else b_flops / r for r in reached]
    logs = [math.log(x) for x in speedups if x is not None]
    if len(logs) < len(speedups):
        m, se, result = (mean_and_var(logs)[0] if logs else math.nan), math.nan, "not reproduced"
    else:
        m, var = mean_and_var(logs)
        se = math.sqrt(var / len(logs)) if len(logs) > 1 else math.nan
        gap = m - math.log(factor)
        result = ("inconclusive" if math.isnan(se) else "reproduced" if gap > 2 * se
                  else "not reproduced" if gap < -2 * se else "inconclusive")
    return {"a_mean": math.exp(m) if not math.isnan(m) else math.nan, "b_mean": float(factor),
            "gap": m - math.log(factor) if not math.isnan(m) else math.nan, "se": se, "verdict": result,
            "target": target, "reached": reached, "speedups": speedups}
