"""Claims checked against the numbers: the verdict rule of the experiment runner, on means and standard errors.

For a metric where lower is better (validation loss, FID) the gap of "a beats b" is mean(b) - mean(a); where higher is
better (the GenEval-style overall) it is mean(a) - mean(b): a positive gap always favours a. se is the standard error
of the difference of the two means, sqrt(s_a^2 / n_a + s_b^2 / n_b) with sample variances (n - 1).
- a beats b: reproduced when gap > 2 se, not reproduced when gap < -2 se, inconclusive otherwise.
- a within b: reproduced when |gap| <= 2 se and |gap| <= 5% of b's mean, not reproduced when |gap| > 2 se,
  inconclusive otherwise.
With one seed a variant there is no standard error: every verdict is then inconclusive.
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
