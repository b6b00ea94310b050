"""Collect a result folder's *.json (default benchmarks/results) into one markdown table file: summary.md there."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import add_out_argument
from micro_diffusion.utils.argparsing import parser


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_table(t: dict) -> list[str]:
    """The training-step rows, the masking speed-ups and the MoE comparison."""
    mfu = bool(t.get("device_peak_gflops"))  # on a GPU of the price table: MFU against its spec peak too
    lines = [f"### Training step ({t['device']}, {t['dtype']}, latents {t['latent']}x{t['latent']}, "
             f"captions {t['caption'][0]}x{t['caption'][1]}; {t['dtype']} matmul peak "
             f"{t['matmul_peak_gflops']:.0f} GFLOP/s"
             + (f", spec peak {t['device_peak_gflops']:.0f} GFLOP/s)" if mfu else ")"),
             "", "| preset | masking | mask | s / step | images/s | GFLOP/image | GFLOP/s | share of peak | "
             + ("MFU | " if mfu else "") + "peak MB |", "| --- " * (10 if mfu else 9) + "|"]
    for r in t["runs"]:
        lines.append(f"| {r['preset']} | {r['masking']} | {r['mask_ratio']:.2f} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['gflop_per_image']:.1f} | {r['gflop_per_s']:.0f} | "
                     f"{100 * r['share_of_peak']:.0f}% | " + (f"{100 * r['mfu']:.1f}% | " if mfu else "")
                     + f"{r['peak_memory_mb']:.0f} |")
    lines += ["", "| preset | speed-up 0.75 vs 0 | FLOP ratio | speed-up / FLOP ratio | deferred / naive time |",
              "| --- | --- | --- | --- | --- |"]
    for s in t["speedups"]:
        lines.append(f"| {s['preset']} | {s['time_speedup']:.2f}x | {s['flop_ratio']:.2f}x | "
                     f"{100 * s['speedup_over_flop_ratio']:.0f}% | {s['deferred_over_naive_seconds']:.2f} |")
    lines += ["", "peak MB: the process's peak resident memory up to that row (one process per preset, rows in order)."]
    for r in t["runs"]:
        if r.get("predicted_memory_mb"):
            off = r["predicted_memory_mb"] / r["peak_memory_mb"] - 1
            lines.append(f"- {r['preset']} at {r['mask_ratio']:.2f}: the dry run's memory model predicts "
                         f"{r['predicted_memory_mb']:.0f} MB ({off:+.0%} of the measured peak, no optimizer state).")
    if t.get("reference"):  # --reference DIR: both networks in one process, alternating rounds, same inputs
        lines += ["", "| preset | mask | batch | ours s / step | reference s / step | reference / ours | rounds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['preset']} | {r['mask_ratio']:.2f} | {r['batch']} | {r['ours_seconds']:.2f} | "
                  f"{r['reference_seconds']:.2f} | {r['speedup']:.2f}x | best of {r['rounds']} |"
                  for r in t["reference"]]
    m = t["moe"]
    lines += ["", f"MoE layer (width {m['dim']}, expert hidden {m['hidden']}, {m['tokens']} tokens, batch {m['batch']})"
              f" against a dense FFN of equal FLOPs (hidden {m['dense_hidden']}): {m['moe_over_dense']:.2f}x the time.",
              ""]
    return lines


def checkpointing_table(c: dict) -> list[str]:
    """Step time and peak memory with and without activation checkpointing, and the memory model's prediction."""
    lines = [f"### Activation checkpointing ({c['device']}, {c['dtype']}, {c['runs'][0]['preset']}, batch "
             f"{c['runs'][0]['batch']}, latents {c['latent']}x{c['latent']})", "",
             "| mask | blocks | s / step | peak MB | predicted MB | prediction / peak | live tensors MB |",
             "| --- " * 7 + "|"]
    lines += [f"| {r['mask_ratio']:.2f} | {'recomputed' if r['checkpointing'] else 'kept'} | {r['seconds']:.2f} | "
              f"{r['peak_memory_mb']:.0f} | {r['predicted_memory_mb']:.0f} | "
              f"{r['predicted_memory_mb'] / r['peak_memory_mb'] - 1:+.0%} | "
              + (f"{r['live_peak_mb']:.0f} |" if "live_peak_mb" in r else "- |")  # results written before it: none
              for r in c["runs"]]
    lines += [""] + [f"- mask {x['mask_ratio']:.2f}: recomputing takes {x['time_ratio']:.2f}x the step time and saves "
                     f"{x['peak_saved_mb']:.0f} MB of peak resident memory." for x in c["comparison"]] + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Write summary.md from whichever result files exist."""
    p = parser("python -m benchmarks.report", __doc__)
    add_out_argument(p)
    folder = p.parse_args(argv).out
    lines = ["# Benchmark results", "",
             "Written by `make bench` (benchmarks/report.py); raw figures in the JSON files.",
             ""]
    if (t := _load(folder, "train")) is not None:
        lines += train_table(t)
    if (s := _load(folder, "sample")) is not None:
        lines += [f"### Sampling ({s['device']}, {s.get('dtype', 'bf16')}): {s['preset']}, batch {s['batch']}, "
                  f"{s['steps']} {s['sampler']} steps, "
                  f"guidance {s['guidance']}: {s['images_per_s']:.2f} images/s ({s['gflop_per_s']:.0f} GFLOP/s)", ""]
    if (d := _load(folder, "data")) is not None:
        lines += ["### Data", "", "```", json.dumps(d, indent=1), "```", ""]
    if (c := _load(folder, "convert")) is not None:
        lines += ["### Convert", "", "```", json.dumps(c, indent=1), "```", ""]
    if (g := _load(folder, "compose")) is not None:
        lines += [f"### Compositional scenes (one core, target {g['target_scenes_per_s']} scenes/s)", "",
                  "| size | scenes | scenes/s drawn | reader images/s |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['size']} px | {r['scenes']} | {r['scenes_per_s']:.0f} | {r['reader_images_per_s']:.0f} |"
                  for r in g["runs"]] + [""]
    if (k := _load(folder, "checkpointing")) is not None:
        lines += checkpointing_table(k)
    (folder / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
