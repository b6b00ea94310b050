"""An experiment's results.json, its verdicts, PNG plots and report.html (the cost dashboard's page and table)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..cost.report import CSS, cost_table, img_tag, load_run, save_plot, stage_row  # noqa: E402
from ..utils.atomic import write_text_atomic  # noqa: E402
from ..utils.run_folder import REPORT, RESULTS, SCORES  # noqa: E402
from .spec import Experiment  # noqa: E402
from .sweeps import budget_values, crossovers, expand_claims, grid_samplers, sweep_section, swept  # noqa: E402
from .verdict import mean_and_var, speedup_verdict, verdict  # noqa: E402


def claim_value(metrics: dict[str, Any], metric: str) -> float:
    """A run's value of a claim metric: val_loss, fid, or the GenEval-style overall."""
    return float(metrics["geneval"]["overall"] if metric == "geneval" else metrics[metric])


def training_curve(row: dict[str, Any], metric: str) -> tuple[list[float], list[float]]:
    """A run's (cumulative training FLOPs, values) of val_loss or the GenEval-style overall along training."""
    if metric == "val_loss":
        return row["curve"]["flops"], row["curve"]["val_loss"]
    return [p["flops"] for p in row["geneval_curve"]], [p["geneval"] for p in row["geneval_curve"]]


def speedup(rows: list[dict[str, Any]], a: str, b: str, metric: str, factor: float = 1.0) -> dict[str, Any]:
    """Variant a's convergence speed-up over b's final value of metric (verdict.speedup_verdict)."""
    b_rows = [r for r in rows if r["name"] == b]
    return speedup_verdict(metric, [training_curve(r, metric) for r in rows if r["name"] == a],
                           [training_curve(r, metric)[1][-1] for r in b_rows],
                           sum(r["flops"] for r in b_rows) / len(b_rows), factor)


def judge(exp: Experiment, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every claim's means, gap, standard error and verdict from the runs' final metrics (or, for a claim at a
    sampling budget, from their sweeps' best-guidance curves there; for a speed-up, from their training curves)."""
    out = []
    for claim in expand_claims(exp.claims, grid_samplers(rows)):
        where: dict[str, Any] = {}
        if claim["kind"] == "speedup":
            found = speedup(rows, claim["a"], claim["b"], claim["metric"], claim["factor"])
            out.append({"name": claim["name"], "kind": "speedup", "metric": claim["metric"], **found})
            continue
        if "budget" in claim:
            a, b, where = budget_values(rows, claim)
        else:
            a = [claim_value(r["metrics"], claim["metric"]) for r in rows if r["name"] == claim["a"]]
            b = [claim_value(r["metrics"], claim["metric"]) for r in rows if r["name"] == claim["b"]]
        out.append({"name": claim["name"], "kind": claim["kind"], "metric": claim["metric"], **where,
                    **verdict(claim["kind"], claim["metric"], a, b)})
    return out


def write_results(exp: Experiment, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """results.json: every run's steps, FLOPs, dollars and metrics, and the claims' verdicts."""
    trust = out / "data" / "prompts" / SCORES  # the reader on ground truth of the same held-out prompts
    results = {"experiment": exp.name, "variants": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
               "claims": judge(exp, rows),
               "reader": json.loads(trust.read_text())["reader"] if trust.is_file() else None}
    if swept(rows):
        results["crossovers"] = crossovers(rows)
    write_text_atomic(out / RESULTS, json.dumps(results, indent=2) + "\n")
    return results


def _curves_plot(rows: list[dict[str, Any]], x_key: str, xlabel: str, path: Path, metric: str = "val_loss") -> Path:
    """Validation loss (or the GenEval-style curve) against x_key, one line a variant (mean over seeds) with the
    seeds' range shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for name in dict.fromkeys(r["name"] for r in rows):
        if metric == "val_loss":
            curves = [(r["curve"][x_key], r["curve"]["val_loss"]) for r in rows if r["name"] == name]
        else:
            curves = [training_curve(r, metric) for r in rows if r["name"] == name]
        n = min(len(c[1]) for c in curves)
        xs = np.mean([c[0][:n] for c in curves], axis=0)
        ys = np.array([c[1][:n] for c in curves])
        ax.plot(xs, ys.mean(0), label=name, linewidth=1.2, marker="o" if metric != "val_loss" else None, ms=3)
        if len(curves) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2)
    if metric != "val_loss":
        ax.set_xscale("log")
    label = "validation loss (unmasked)" if metric == "val_loss" else "GenEval-style overall (held-out points)"
    return save_plot(fig, ax, path, f"{label.split(' (')[0]} against {xlabel}", xlabel, label)


def _quality_cost_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """GenEval-style overall and FID of each run against its sampling FLOPs per image (the variant's fixed point),
    one colour a variant; None when the results record no sampling cost (older runs)."""
    if not all("flops_per_image" in r["metrics"] for r in rows):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r["metrics"] for r in rows if r["name"] == name]
        xs = [m["flops_per_image"] for m in runs]
        axes[0].scatter(xs, [m["geneval"]["overall"] for m in runs], label=name, s=18)
        axes[1].scatter(xs, [m["fid"] for m in runs], label=name, s=18)
    for ax in axes:
        ax.set_xscale("log")
    axes[0].set(xlabel="sampling FLOPs per image", ylabel="GenEval-style overall (higher is better)")
    axes[0].grid(alpha=0.3)
    return save_plot(fig, axes[1], path, "", "sampling FLOPs per image", "FID (lower is better)")


def _fmt_spread(values: list[float]) -> str:
    mean, var = mean_and_var(values)
    return f"{mean:.4g}" if not np.isfinite(var) else f"{mean:.4g} ± {np.sqrt(var):.2g}"


Table = tuple[list[str], list[list[str]]]  # column names, rows of cells (plain text)


def metrics_cells(rows: list[dict[str, Any]]) -> Table:
    """Final metrics per variant as mean +- standard deviation over seeds, with steps, FLOPs and parameters."""
    cols = ["variant", "seeds", "steps", "training FLOPs", "parameters", "val loss", "FID", "GenEval-style overall",
            "sampler", "sampling FLOPs/image", "images/s"]
    body = []
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        m = runs[0]["metrics"]
        point = m.get("sampling")  # older results record no sampling point
        body.append([name, str(len(runs)), str(runs[0]["steps"]), f"{runs[0]['flops']:.3g}",
                     f"{runs[0]['parameters']:,}", _fmt_spread([r["metrics"]["val_loss"] for r in runs]),
                     _fmt_spread([r["metrics"]["fid"] for r in runs]),
                     _fmt_spread([r["metrics"]["geneval"]["overall"] for r in runs]),
                     f"{point['sampler']} {point['steps']}, guidance {point['guidance']:g}" if point else "",
                     f"{m['flops_per_image']:.3g}" if "flops_per_image" in m else "",
                     _fmt_spread([r["metrics"]["images_per_s"] for r in runs]) if "images_per_s" in m else ""])
    return cols, body


def task_cells(rows: list[dict[str, Any]]) -> Table:
    """GenEval-style accuracy per task and overall, per variant (mean +- standard deviation over seeds)."""
    tasks = [t for t in rows[0]["metrics"]["geneval"] if t != "overall"]
    body = [[name, *[_fmt_spread([r["metrics"]["geneval"][t] for r in rows if r["name"] == name])
                     for t in [*tasks, "overall"]]] for name in dict.fromkeys(r["name"] for r in rows)]
    return ["variant", *tasks, "overall"], body


def convergence_cells(rows: list[dict[str, Any]], reference: str) -> Table:
    """Per variant and metric along training: the FLOPs at which each seed first reaches the reference variant's
    final value (mean over its seeds), and the speed-up (reference FLOPs over those; geometric mean, seeds' range)."""
    cols = ["variant", "metric", f"target ({reference} final)", "FLOPs to reach (per seed)", "speed-up (per seed)",
            "speed-up (geometric mean)"]
    metrics = ["val_loss"] + (["geneval"] if all(r.get("geneval_curve") for r in rows) else [])
    body = []
    for metric in metrics:
        for name in dict.fromkeys(r["name"] for r in rows):
            found = speedup(rows, name, reference, metric)
            body.append([name, metric, f"{found['target']:.4g}",
                         ", ".join("never" if f is None else f"{f:.3g}" for f in found["reached"]),
                         ", ".join("-" if x is None else f"{x:.2f}x" for x in found["speedups"]),
                         "-" if None in found["speedups"] else f"{found['a_mean']:.2f}x"])
    return cols, body


def claims_cells(claims: list[dict[str, Any]]) -> Table:
    """Each claim with its means, gap (positive favours a), twice its standard error and verdict; a speed-up claim
    gives its geometric-mean speed-up as a, the factor it needs as b, and the gap in log speed-up."""
    cols = ["claim", "kind", "metric", "a mean", "b mean", "gap", "2 se", "verdict"]

    def where(c: dict[str, Any]) -> str:  # a claim at a sampling budget names it
        return f" at {c['flops_per_image']:.3g} FLOPs/image" if "budget" in c else ""

    return cols, [[c["name"] + where(c), c["kind"], c["metric"], f"{c['a_mean']:.4g}", f"{c['b_mean']:.4g}",
                   f"{c['gap']:.3g}", f"{2 * c['se']:.3g}", c["verdict"]] for c in claims]


def html_table(table: Table, table_id: str, bold_last: bool = False) -> str:
    """The table as HTML, cells escaped (the last column bold when asked: the verdicts)."""
    cols, body = table
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    last = "<td><b>{}</b></td>" if bold_last else "<td>{}</td>"
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r[:-1]) + last.format(html.escape(r[-1])) + "</tr>"
            for r in body]
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def markdown_table(table: Table) -> str:
    """The table as GitHub markdown."""
    cols, body = table
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]) + "\n"


def _trust_note(reader: dict[str, Any] | None) -> str:
    """One line: the GenEval-style reader's overall on ground truth, shuffled pairs and through the VAE."""
    if not reader:
        return ""
    parts = [f"{k.replace('_', ' ')} {reader[k]['overall']:.3f}" for k in ("ground_truth", "shuffled", "chance", "vae")
             if k in reader]
    return f'<p class="note">GenEval-style reader on ground truth of the held-out prompts: {", ".join(parts)}.</p>'


def write_report(exp: Experiment, rows: list[dict[str, Any]], out: Path) -> Path:
    """results.json, the plots, summary.md (the claims and metrics tables in markdown) and report.html in `out`."""
    results = write_results(exp, rows, out)
    plots = [_curves_plot(rows, "flops", "training FLOPs", out / "val_loss_flops.png"),
             _curves_plot(rows, "usd", "dollars", out / "val_loss_usd.png")]
    if all(r.get("geneval_curve") for r in rows):
        plots.append(_curves_plot(rows, "flops", "training FLOPs", out / "geneval_flops.png", metric="geneval"))
    references = list(dict.fromkeys(c["b"] for c in exp.claims if c["kind"] == "speedup"))
    convergence = [convergence_cells(rows, ref) for ref in references]
    stages = []
    for r in rows:
        for folder in sorted(Path(r["run_dir"]).glob("stage*")):
            stages.append({**stage_row(load_run(folder)), "stage": f"{r['name']} seed {r['seed']} {folder.name}"})
    parts = [f"<h1>Experiment: {html.escape(exp.name)}</h1>",
             f'<p class="note">Budget {html.escape(json.dumps(exp.budget))} per run; seeds {exp.seeds}; '
             "verdicts by the rule in docs/interfaces.md (2 standard errors; within: and 5% of b).</p>",
             "<h2>Claims</h2>", html_table(claims_cells(results["claims"]), "claims-table", True),
             "<h2>Final metrics</h2>", html_table(metrics_cells(rows), "metrics-table"), _trust_note(results["reader"]),
             "<h2>GenEval-style score per task</h2>", html_table(task_cells(rows), "tasks-table"),
             *[part for table in convergence for part in
               ("<h2>Convergence: FLOPs to reach the reference's final value</h2>", html_table(table, "convergence"))],
             "<h2>Validation loss (and GenEval-style score) against compute</h2>",
             *[img_tag(p, p.stem) for p in plots]]
    quality = _quality_cost_plot(rows, out / "quality_sampling_cost.png")
    if quality is not None:
        parts += ["<h2>Quality against sampling cost (each variant at its own sampler)</h2>",
                  img_tag(quality, quality.stem)]
    if swept(rows):
        figures, table = sweep_section(rows, out)
        parts += ["<h2>Quality against sampling cost</h2>", *[img_tag(p, p.stem) for p in figures], table]
    parts += ["<h2>Cost of every run</h2>", cost_table(stages)]
    (out / "summary.md").write_text(f"## {exp.name}\n\n" + markdown_table(claims_cells(results["claims"])) + "\n"
                                    + markdown_table(metrics_cells(rows)) + "\n" + markdown_table(task_cells(rows))
                                    + "".join("\n" + markdown_table(table) for table in convergence),
                                    encoding="utf-8")
    page = out / REPORT
    page.write_text("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                    f'<link rel="icon" href="data:,"><title>micro_diffusion experiment {html.escape(exp.name)}</title>'
                    f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")
    return page
