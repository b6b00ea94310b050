"""Sampling sweeps (in the spirit of arXiv 2404.01367): FID against guidance scale, and FID against sampling cost.

Cost is the network FLOPs of sampling one image (forward FLOPs per evaluation x evaluations, doubled by guidance),
normalised to a reference preset (Heun, 30 steps), so samplers with different evaluations per step compare fairly.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..cost.flops import sample_flops_per_image
from ..diffusion.sampling import SamplingSettings
from .coco import DRAW_SEED, Render, draw_captions, generate_missing, prepare_reference
from .fid import fid_kid
from .generate import TextToImage

REFERENCE_PRESET = "heun:30"
Score = Callable[[Path, Path], float]  # (generated folder, reference folder) -> FID


def parse_preset(preset: str) -> tuple[str, int]:
    """'SAMPLER:STEPS' -> (sampler, steps)."""
    sampler, sep, steps = preset.partition(":")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"preset {preset!r} is not SAMPLER:STEPS (e.g. heun:30)")
    return sampler, int(steps)


def sweep_configs(base: SamplingSettings, guidances: list[float], presets: list[str]) -> dict[str, list]:
    """The settings of each point: one guidance sweep at the base sampler, one cost sweep at the base guidance."""
    for p in presets:
        parse_preset(p)
    return {"guidance": [replace(base, guidance=g) for g in guidances],
            "cost": [replace(base, sampler=parse_preset(p)[0], steps=parse_preset(p)[1]) for p in presets]}


def point_name(s: SamplingSettings) -> str:
    """Folder name of one sweep point."""
    return f"{s.sampler}_{s.steps}_g{s.guidance:g}"


def sweep(draw: list[dict], ref_dir: Path, out: Path, configs: dict[str, list],
          make_render: Callable[[SamplingSettings], Render], score: Score, flops: Callable[[SamplingSettings], int],
          batch_size: int = 16) -> dict:
    """Generate (resumably) and score every point once; the same point in both sweeps is scored once."""
    ref_sampler, ref_steps = parse_preset(REFERENCE_PRESET)
    results: dict[str, dict] = {}
    for settings in [s for group in configs.values() for s in group]:
        name = point_name(settings)
        if name in results:
            continue
        gen = out / name
        generate_missing(draw, gen, make_render(settings), batch_size=batch_size)
        ref_cost = flops(replace(settings, sampler=ref_sampler, steps=ref_steps))
        results[name] = {"fid": float(score(gen, ref_dir)), "flops_per_image": int(flops(settings)),
                         "relative_cost": flops(settings) / ref_cost, **settings.to_dict()}
    return {group: [results[point_name(s)] for s in settings] for group, settings in configs.items()}


def plot(result: dict, path: Path) -> None:
    """Two panels: FID against guidance scale; FID against relative sampling cost, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    g = result["guidance"]
    a.plot([p["guidance"] for p in g], [p["fid"] for p in g], "o-")
    a.set(xlabel="guidance scale", ylabel="FID", title=f"{g[0]['sampler']}, {g[0]['steps']} steps")
    for sampler in sorted({p["sampler"] for p in result["cost"]}):
        pts = sorted((p for p in result["cost"] if p["sampler"] == sampler), key=lambda p: p["relative_cost"])
        b.plot([p["relative_cost"] for p in pts], [p["fid"] for p in pts], "o-", label=sampler)
    b.set(xlabel=f"sampling FLOPs relative to {REFERENCE_PRESET}", ylabel="FID", xscale="log", title="FID vs cost")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(model: str | Path, annotations: str | Path, images: str | Path, out: str | Path, num: int = 5000,
              guidances: list[float] | None = None, presets: list[str] | None = None, seed: int = 0,
              use_ema: bool | None = None, device: str | None = None, batch_size: int = 16,
              base: SamplingSettings | None = None, draw_seed: int = DRAW_SEED) -> dict:
    """Both sweeps on the first `num` captions of the COCO draw; writes sweep.json and sweep.png into `out`."""
    out = Path(out)
    base = base or SamplingSettings()
    configs = sweep_configs(base, guidances or [1.0, 2.0, 3.0, 5.0, 7.5], presets or [REFERENCE_PRESET])
    draw = draw_captions(annotations, num, draw_seed)
    probe = TextToImage(model, base, seed, use_ema, device)
    size = probe.resolution
    ref_dir = out / f"reference_{num}"
    prepare_reference(draw, images, ref_dir, size)

    def flops(s: SamplingSettings) -> int:
        return sample_flops_per_image(probe.net, latent_size=probe.latent_hw, caption_len=probe.text.caption_len,
                                      steps=s.steps, sampler=s.sampler, guidance=s.guidance != 1.0)

    def make_render(s: SamplingSettings) -> Render:
        probe.settings = s  # one loaded model serves every point; only the sampling settings change
        return probe

    result = sweep(draw, ref_dir, out, configs, make_render,
                   lambda g, r: fid_kid(g, r, device=str(probe.device))["fid"], flops, batch_size)
    result["settings"] = {"model": str(model), "annotations": str(annotations), "num_captions": num,
                          "draw_seed": draw_seed, "resolution": size, "reference_preset": REFERENCE_PRESET,
                          "base": base.to_dict(), "seed": seed, "weights": probe.config["weights_file"],
                          "cost": "sample_flops_per_image (forward FLOPs x evaluations, "
                          "x2 with guidance) / the same at the reference preset"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "sweep.png")
    return result
