"""The sweep figure, for one model (`eval sweep`) and for a family of sizes (the sizes experiment's report).

One column a sampler. Rows: FID and (on compositional prompts) the GenEval-style overall against sampling FLOPs per
image, one best-guidance curve a model (Mei et al. Figures 9 and 11), the spread over seeds shaded; then the best
guidance scale (by FID) of each model at each step count (their Figure 8).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .envelope import Point, best_guidance, envelope

Runs = dict[str, Sequence[Sequence[Point]]]  # label -> one list of sweep points a seed


def samplers_of(runs: Runs) -> list[str]:
    """Samplers in first-seen order."""
    return list(dict.fromkeys(p["sampler"] for seeds in runs.values() for points in seeds for p in points))


def mean_envelope(seeds: Sequence[Sequence[Point]], metric: str, sampler: str) -> tuple[np.ndarray, ...]:
    """(FLOPs, mean, min, max) over seeds of the best-guidance curves (every seed has the same grid)."""
    curves = [envelope(points, metric, sampler) for points in seeds]
    n = min(len(c[0]) for c in curves)
    flops = np.mean([c[0][:n] for c in curves], axis=0)
    ys = np.array([c[1][:n] for c in curves])
    return flops, ys.mean(0), ys.min(0), ys.max(0)


def plot_sweep(runs: Runs, path: Path) -> Path:
    """Write the figure as a PNG; `runs` maps a label to its seeds' sweep points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = samplers_of(runs)
    metrics = ["fid"] + (["geneval"] if all("geneval" in p for s in runs.values() for ps in s for p in ps) else [])
    rows = len(metrics) + 1
    fig, axes = plt.subplots(rows, len(samplers), figsize=(3.6 * len(samplers), 3.0 * rows), squeeze=False, dpi=100)
    for col, sampler in enumerate(samplers):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for label, seeds in runs.items():
                flops, mean, lo, hi = mean_envelope(seeds, metric, sampler)
                ax.plot(flops, mean, "o-", markersize=3, linewidth=1.2, label=label)
                if len(seeds) > 1:
                    ax.fill_between(flops, lo, hi, alpha=0.2)
            ax.set(xscale="log", title=sampler, xlabel="sampling FLOPs per image",
                   ylabel="FID" if metric == "fid" else "GenEval-style overall")
            ax.grid(alpha=0.3)
        ax = axes[-1][col]
        for label, seeds in runs.items():
            chosen = [best_guidance(points, "fid", sampler) for points in seeds]
            steps = [p["steps"] for p in chosen[0]]
            ax.plot(steps, np.mean([[p["guidance"] for p in c] for c in chosen], axis=0), "o-", markersize=3,
                    label=label)
        ax.set(xscale="log", title=f"{sampler}: best guidance (by FID)", xlabel="steps", ylabel="guidance scale")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
