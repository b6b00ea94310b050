"""A self-contained HTML dashboard of one or more run folders: cost table, loss and evaluations against dollars.

Reads each run folder (docs/interfaces.md): cost.jsonl (the cost ledger), metrics.jsonl (one JSON line per step,
{"step": n, "loss/train/total": ...}), evaluation results as JSON files (`eval*.json` in the folder or any
`eval/*.json`: numeric top-level values are metrics, an optional "step" places them in training) and samples/*.png.
The page needs no network: inline CSS, plots as inline base64 PNGs, which are also written beside it.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..errors import UsageError  # noqa: E402
from ..utils.run_folder import BAD_SAMPLES_SKIPPED as BAD_SAMPLES  # noqa: E402
from ..utils.run_folder import COST, METRICS, REPORT, STAGE_MFU, STEP, TRAIN_LOSS, read_metrics, samples_dir  # noqa: E402  # noqa: E402
from .ledger import read_records  # noqa: E402


@dataclass
class RunData:
    """What one run folder holds for the dashboard."""

    path: Path
    cost: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)
    sample: Path | None = None

    @property
    def name(self) -> str:
        """The stage name of the ledger, else the folder name."""
        return self.cost[-1]["stage"] if self.cost else self.path.name


def _read_evals(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted([*run_dir.glob("eval*.json"), *run_dir.glob("eval/*.json")])
    evals = []
    for path in files:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an evaluation file must hold a JSON object, got {type(data).__name__}")
        numbers = {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and k != "step"}
        evals.append({"file": path.name, "step": data.get("step"), "metrics": numbers})
    return evals


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder; a folder with neither a cost ledger nor a metrics log is an error naming it."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"run folder {path} does not exist: give runs/<stage> folders written by training")
    cost, metrics = read_records(path), read_metrics(path)
    if not cost and not metrics:
        raise UsageError(f"run folder {path} holds no {COST} or {METRICS} to report on: give a folder training wrote")
    samples = sorted(samples_dir(path).glob("*.png"), key=lambda p: (p.stat().st_mtime, p.name))
    return RunData(path, cost, metrics, _read_evals(path), samples[-1] if samples else None)


def spend_at(run: RunData, steps: np.ndarray, key: str, totals: str = "total") -> np.ndarray:
    """Running total `key` ('usd' or 'device_hours') at training steps: carried-over stages included ("total"),
    or this stage's alone (totals="stage_totals")."""
    by_batch: dict[int, float] = {}
    for record in run.cost:  # a resumed session logs the redone batches again with more spend: the later wins
        by_batch[int(record["batch"])] = float(record[totals][key])
    if not by_batch:
        return np.full(len(steps), np.nan)
    xs = np.array(sorted(by_batch), dtype=float)
    ys = np.maximum.accumulate(np.array([by_batch[int(x)] for x in xs]))
    return np.interp(steps.astype(float), xs, ys)


def stage_row(run: RunData) -> dict[str, Any]:
    """One row of the cost table from a run's last ledger record, and the bad samples skipped (metrics.jsonl)."""
    bad = sum(int(row.get(BAD_SAMPLES, 0)) for row in run.metrics)  # every step once: resumes supersede rows
    if not run.cost:
        return {"stage": run.name, "device": "", "device_hours": np.nan, "usd": np.nan, "flops": np.nan,
                "mfu": np.nan, "samples": np.nan, "wall_hours": np.nan, "bad_samples": bad}
    last = run.cost[-1]
    stage = last["stage_totals"]
    return {"stage": run.name, "device": f"{last['devices']} x {last['device_type']}",
            "device_hours": stage["device_hours"], "usd": stage["usd"], "flops": stage["flops"],
            "mfu": last["metrics"][STAGE_MFU], "samples": stage["samples"],
            "wall_hours": stage["wall_seconds"] / 3600, "bad_samples": bad}


def total_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum over stages; utilisation weighted by device-hours."""
    hours = sum(r["device_hours"] for r in rows)
    mfu = sum(r["mfu"] * r["device_hours"] for r in rows) / hours if hours else np.nan
    keys = ("device_hours", "usd", "flops", "samples", "wall_hours", "bad_samples")
    sums = {k: sum(r[k] for r in rows) for k in keys}
    return {"stage": "total", "device": "", **sums, "mfu": mfu}


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: list[tuple[str, np.ndarray, np.ndarray]],
          marker: str = "") -> Path | None:
    """One line per series; nothing is written when no series has a point."""
    series = [(n, x, y) for n, x, y in series if len(x) and np.isfinite(x).any()]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for name, xs, ys in series:
        ax.plot(xs, ys, marker or "-", label=name, linewidth=1.2)
    return save_plot(fig, ax, path, title, xlabel, ylabel)


def save_plot(fig: plt.Figure, ax: plt.Axes, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Label, grid and legend the axes, write the figure as a PNG and close it."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(runs: list[RunData], prefix: Path) -> list[Path]:
    """Loss against dollars and against device-hours, and evaluation metrics against dollars, as PNG files."""
    losses = []
    for run in runs:
        rows = [r for r in run.metrics if TRAIN_LOSS in r and r.get(STEP) is not None]
        # Composer logs a batch's loss under the batches completed before it; its cost is paid when it completes
        steps = np.array([r[STEP] + 1 for r in rows], dtype=float)
        losses.append((run.name, steps, np.array([r[TRAIN_LOSS] for r in rows], dtype=float), run))
    by_usd = [(n, spend_at(r, s, "usd"), y) for n, s, y, r in losses]
    by_hours = [(n, spend_at(r, s, "device_hours"), y) for n, s, y, r in losses]
    out = [
        _plot(Path(f"{prefix}_loss_usd.png"), "training loss against dollars", "dollars (running total)", "loss",
              by_usd),
        _plot(Path(f"{prefix}_loss_device_hours.png"), "training loss against device-hours",
              "device-hours (running total)", "loss", by_hours),
    ]
    evals: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        end = float(run.cost[-1]["total"]["usd"]) if run.cost else np.nan
        for ev in run.evals:  # an evaluation without a step is placed at the end of its run
            usd = spend_at(run, np.array([ev["step"]]), "usd")[0] if ev["step"] is not None else end
            for key, value in ev["metrics"].items():
                evals.setdefault(key, []).append((usd, value))
    for key, points in sorted(evals.items()):
        points.sort()
        xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        safe = "".join(c if c.isalnum() else "_" for c in key)
        out.append(_plot(Path(f"{prefix}_eval_{safe}.png"), f"{key} against dollars", "dollars (running total)",
                         key, [(key, xs, ys)], marker="o-"))
    return [p for p in out if p is not None]


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.total td { font-weight: bold; border-top: 2px solid #888; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
.note { color: #666; font-size: 0.9em; }
"""


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, str):
        return html.escape(value)
    return "" if value is None or not np.isfinite(value) else format(value, spec)


def img_tag(path: Path, alt: str) -> str:
    """An <img> tag holding the PNG inline (base64), so the page needs no other file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def cost_table(rows: list[dict[str, Any]]) -> str:
    """The per-stage and total cost table as HTML."""
    cols = [("stage", "stage", "s"), ("devices", "device", "s"), ("wall-clock hours", "wall_hours", ",.2f"),
            ("device-hours", "device_hours", ",.2f"), ("dollars", "usd", ",.2f"), ("FLOPs", "flops", ".3g"),
            ("utilisation", "mfu", ".1%"), ("bad samples skipped", "bad_samples", ",.0f"),
            ("images seen", "samples", ",.0f")]
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in cols)
    body = []
    for row in [*rows, total_row(rows)]:
        cls = ' class="total"' if row["stage"] == "total" else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_fmt(row[key], spec)}</td>" for _, key, spec in cols) + "</tr>")
    return f'<table id="cost-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(runs: list[RunData], plots: list[Path]) -> str:
    """The dashboard page: cost table, plots and the latest sample grid, with everything inline."""
    rows = [stage_row(r) for r in runs]
    parts = [f"<h1>Training cost: {html.escape(', '.join(r.name for r in runs))}</h1>",
             "<h2>Cost per stage</h2>", cost_table(rows),
             '<p class="note">Utilisation: achieved FLOP/s over the device peak in the precision the run computed '
             "in (the ledger's peak_dtype: bf16 autocast on GPUs, fp32 as CPU runs train), FLOPs counted "
             "analytically (micro_diffusion.cost.flops).</p>"]
    if plots:
        parts.append("<h2>Loss and evaluations against cost</h2>")
        parts += [img_tag(p, p.stem) for p in plots]
    else:
        parts.append('<p class="note">No training loss or evaluation results to plot yet.</p>')
    sampled = [r for r in runs if r.sample is not None]
    if sampled:
        latest = max(sampled, key=lambda r: r.sample.stat().st_mtime)
        parts += [f"<h2>Latest samples ({html.escape(latest.name)}: {html.escape(latest.sample.name)})</h2>",
                  img_tag(latest.sample, "latest sample grid")]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<link rel="icon" href="data:,"><title>micro_diffusion cost report</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the dashboard (default: report.html in the first run folder) and its PNG plots beside it."""
    if not run_dirs:
        raise UsageError("give at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out) if out is not None else runs[0].path / REPORT
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: give the HTML file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out.with_suffix(""))
    out.write_text(render_html(runs, plots), encoding="utf-8")
    return out
