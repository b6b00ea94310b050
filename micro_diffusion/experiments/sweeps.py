"""An experiment's sampling sweeps: claims at common sampling budgets, crossovers, and the report's section.

Each run's sweep (metrics["sweep"], one record a sampling point) gives one best-guidance curve a sampler and metric
(micro_diffusion.eval.envelope). A claim with `budget: lowest | highest` compares two variants at the lowest or
highest sampling FLOPs per image that every run of the experiment covers, each seed's curve interpolated there in
log-FLOPs; `sampler: each` stands for one such claim a sampler of the grid.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..eval.envelope import common_range, crossover, envelope, interpolate
from ..eval.sweep_plots import mean_envelope, plot_sweep

Row = dict[str, Any]  # a results.json variant row


def swept(rows: list[Row]) -> list[Row]:
    """The rows that carry a sweep."""
    return [r for r in rows if "sweep" in r["metrics"]]


def grid_samplers(rows: list[Row]) -> list[str]:
    """Samplers of the runs' sweeps, in grid order."""
    return list(dict.fromkeys(p["sampler"] for r in swept(rows) for p in r["metrics"]["sweep"]))


def expand_claims(claims: list[dict[str, str]], samplers: list[str]) -> list[dict[str, str]]:
    """Claims with `sampler: each` replaced by one claim a sampler, named with it."""
    out = []
    for c in claims:
        if c.get("sampler") == "each":
            out += [{**c, "sampler": s, "name": f"{c['name']} [{s}]"} for s in samplers]
        else:
            out.append(c)
    return out


def budget_values(rows: list[Row], claim: dict[str, str]) -> tuple[list[float], list[float], dict[str, Any]]:
    """Each seed's value of a and of b at the claim's common budget, and that budget (nan when there is none)."""
    metric, sampler = claim["metric"], claim["sampler"]
    curves = {id(r): envelope(r["metrics"]["sweep"], metric, sampler) for r in swept(rows)}
    span = common_range(list(curves.values()))
    budget = float("nan") if span is None else span[0] if claim["budget"] == "lowest" else span[1]

    def at(name: str) -> list[float]:
        return [float(interpolate(curves[id(r)], budget)[0]) if span else float("nan")
                for r in swept(rows) if r["name"] == name]

    return at(claim["a"]), at(claim["b"]), {"budget": claim["budget"], "sampler": sampler,
                                            "flops_per_image": budget}


def by_size(rows: list[Row]) -> list[str]:
    """Variant names from fewest to most parameters."""
    names = list(dict.fromkeys(r["name"] for r in swept(rows)))
    return sorted(names, key=lambda n: next(r["parameters"] for r in rows if r["name"] == n))


def crossovers(rows: list[Row]) -> list[dict[str, Any]]:
    """For each sampler and metric, the budget from which the largest variant is at least as good as the smallest:
    for each seed (same-seed pairs) and for the curves' means over seeds. None: the largest never catches up."""
    names = by_size(rows)
    if len(names) < 2:
        return []
    small, large = names[0], names[-1]
    seeds = sorted({r["seed"] for r in swept(rows) if r["name"] == small} &
                   {r["seed"] for r in swept(rows) if r["name"] == large})
    out = []
    for sampler in grid_samplers(rows):
        for metric in ("fid", "geneval"):
            pair = {}
            for seed in seeds:
                s, g = (envelope(next(r for r in swept(rows) if r["name"] == n and r["seed"] == seed)["metrics"]
                                 ["sweep"], metric, sampler) for n in (small, large))
                pair[seed] = crossover(s, g, metric)
            mean = [mean_envelope([r["metrics"]["sweep"] for r in swept(rows) if r["name"] == n], metric, sampler)[:2]
                    for n in (small, large)]
            out.append({"sampler": sampler, "metric": metric, "small": small, "large": large,
                        "per_seed": pair, "mean": crossover(*mean, metric)})
    return out


def _fmt(flops: float | None) -> str:
    return "never" if flops is None else f"{flops:.3g}"


def sweep_section(rows: list[Row], out: Path) -> tuple[list[Path], str]:
    """The sweep figure (one curve a variant, by size) and the crossover table, for the report."""
    names = by_size(rows)
    figure = plot_sweep({n: [r["metrics"]["sweep"] for r in swept(rows) if r["name"] == n] for n in names},
                        out / "sweep_sizes.png")
    cols = ["sampler", "metric", "smaller", "larger", "crossover (mean over seeds)", "per seed"]
    body = ["<tr>" + "".join(f"<td>{c}</td>" for c in [
        c["sampler"], c["metric"], html.escape(c["small"]), html.escape(c["large"]), _fmt(c["mean"]),
        ", ".join(f"seed {s}: {_fmt(v)}" for s, v in c["per_seed"].items())]) + "</tr>" for c in crossovers(rows)]
    head = "".join(f"<th>{c}</th>" for c in cols)
    table = (f'<table id="crossover-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
             '<p class="note">Crossover: the sampling FLOPs per image from which the larger model is at least as '
             "good as the smaller one up to the highest budget both cover (best guidance at each point).</p>")
    return [figure], table
