"""`micro-diffusion data mix RECIPE [--data-root DIR]`: the streams a recipe will read, their sizes and shares, and
what is missing, against the paper's training mix.

Sample counts come from each stream's MDS index.json; nothing is downloaded, so a remote stream without a local copy
of its index is reported as not checked. Exit code 1 when a stream is missing or empty, 2 for a bad recipe, else 0.
The step is `mix(recipe, data_root)`; the command only parses its arguments.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from micro_diffusion.data.schema import read_index_samples
from micro_diffusion.recipe import load_recipe, resolve_streams

# The paper's 37M-image training mix (Sehwag et al., "Stretching Each Dollar", arXiv 2407.15811): images per source.
# Confirmed from public text here: 37M in all, 22M real (SA-1B with LLaVA captions, CC12M, TextCaps) and 15M synthetic
# (JourneyDB, DiffusionDB), from the paper's abstract and the public release's README; JourneyDB 4.2M and DiffusionDB
# 10.7M as a later paper citing it (Ambient-o, Daras et al.) quotes them, and JourneyDB's own card gives 4,189,737
# labelled training images. NOT confirmed against the paper's dataset table, which could not be read offline:
# SA-1B 11.1M, CC12M 10.9M and TextCaps 0.02M are the figures that make up its 22M of real images (Ambient-o rounds the
# first two to 11M and 12M); check them against the table before relying on the shares to the percent.
PAPER_MIX: dict[str, int] = {
    "sa1b": 11_100_000,
    "cc12m": 10_900_000,
    "textcaps": 20_000,
    "journeydb": 4_200_000,
    "diffusiondb": 10_700_000,
}
# Stream folder names that stand for a paper source (the public release calls two of them jdb and diffdb).
_ALIASES = {"sa1b": ("sa1b", "sam"), "cc12m": ("cc12m",), "textcaps": ("textcaps",),
            "journeydb": ("journeydb", "jdb"), "diffusiondb": ("diffusiondb", "diffdb")}


def paper_source(local: str | None, remote: str | None = None) -> str | None:
    """The paper source a stream stands for, from its folder name (`data/latents/cc12m_512` -> `cc12m`), if any."""
    name = re.sub(r"[^a-z0-9]", "", Path(str(local or remote or "").rstrip("/")).name.lower())
    return next((src for src, names in _ALIASES.items() if name.startswith(names)), None)


def _stream_row(i: int, stream: dict) -> dict[str, Any]:
    """One stream's entry: its folder, sample count and status (ok, empty, missing, remote_unchecked)."""
    local, remote = stream["local"], stream["remote"]
    row = {"stream": f"data.streams[{i}]", "local": local, "remote": remote, "proportion": stream["proportion"],
           "samples": None, "status": "ok", "problem": None, "paper_source": paper_source(local, remote)}
    try:
        row["samples"] = read_index_samples(local) if local is not None else None
    except FileNotFoundError as err:
        row["status"] = "remote_unchecked" if remote is not None else "missing"
        row["problem"] = f"{err}" + (f" (remote {remote} not checked: no network here)" if remote else "")
    except ValueError as err:
        row["status"], row["problem"] = "missing", str(err)
    if row["samples"] is None and local is None:
        row["status"], row["problem"] = "remote_unchecked", f"remote {remote} not checked: no local index"
    elif row["samples"] == 0:
        row["status"], row["problem"] = "empty", f"{local}: the index lists no samples"
    return row


def mix_report(cfg: dict) -> dict[str, Any]:
    """The mix of a loaded recipe: per-stream samples and shares, the paper's counts and shares, what is missing."""
    rows = [_stream_row(i, s) for i, s in enumerate(resolve_streams(cfg))]
    counted = sum(r["samples"] or 0 for r in rows)
    proportions = [r["proportion"] for r in rows]
    weights = proportions if rows and all(p is not None for p in proportions) else [r["samples"] for r in rows]
    total_weight = sum(w or 0 for w in weights)
    matched = {r["paper_source"] for r in rows if r["paper_source"]}
    paper_total = sum(PAPER_MIX[s] for s in matched)
    for r, w in zip(rows, weights, strict=True):
        r["share"] = (w / total_weight) if w is not None and total_weight else None
        src = r["paper_source"]
        r["paper_samples"] = PAPER_MIX[src] if src else None
        r["paper_share"] = PAPER_MIX[src] / paper_total if src else None
    return {
        "data_root": cfg["data"]["root"],
        "share_by": "proportion" if weights is proportions else "samples",
        "streams": rows,
        "total_samples": counted,
        "paper_total_samples": sum(PAPER_MIX.values()),
        "missing": [f"{r['stream']}: {r['problem']}" for r in rows if r["status"] in ("missing", "empty")],
        "not_checked": [f"{r['stream']}: {r['problem']}" for r in rows if r["status"] == "remote_unchecked"],
        "paper_sources_not_read": sorted(set(PAPER_MIX) - matched),
    }


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table with the problems listed under it."""
    head = ("stream", "folder", "samples", "share", "paper source", "paper samples", "paper share", "status")
    body = [(r["stream"], r["local"] or r["remote"], _count(r["samples"]), _pct(r["share"]), r["paper_source"] or "-",
             _count(r["paper_samples"]), _pct(r["paper_share"]), r["status"]) for r in report["streams"]]
    body.append(("total", "", _count(report["total_samples"]), "", "", "", "", ""))
    widths = [max(len(str(row[c])) for row in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    lines.append(f"shares by {report['share_by']}; paper shares over the paper sources this recipe reads "
                 f"(the paper's whole mix: {_count(report['paper_total_samples'])} images)")
    for title, key in (("missing", "missing"), ("not checked", "not_checked")):
        lines += [f"{title}: {p}" for p in report[key]]
    if report["paper_sources_not_read"]:
        lines.append(f"paper sources this recipe does not read: {', '.join(report['paper_sources_not_read'])}")
    return "\n".join(lines)


def mix(recipe: str | Path, data_root: str | Path | None = None) -> dict[str, Any]:
    """The mix report of a recipe file (its data.root replaced by data_root if given); RecipeError for a bad recipe."""
    cfg = load_recipe(recipe)
    if data_root is not None:
        cfg["data"]["root"] = str(data_root)
    return {"recipe": str(recipe), **mix_report(cfg)}
