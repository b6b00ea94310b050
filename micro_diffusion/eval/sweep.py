"""Sampling sweeps (in the spirit of Mei et al., arXiv 2404.01367): a grid of samplers x steps x guidance scales.

Each point is scored by FID against real images (COCO, or held-out compositional scenes) and, on the compositional
set, by the GenEval-style score of its held-out prompts; it records its sampling FLOPs per image (the analytic
counter: forward FLOPs x network evaluations, doubled by guidance), that cost relative to a reference preset (Heun,
30 steps, guided) and its measured images/s. A scored point is saved in its folder and reused when the sweep runs again.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data.geneval import read_prompts_file
from ..diffusion.sampling import SamplingSettings, sampler_spec
from ..errors import UsageError, check_counts
from ..utils.atomic import write_text_atomic
from ..utils.run_folder import SWEEP, SWEEP_POINT
from .coco import DRAW_SEED, Render, draw_captions, generate_missing, prepare_reference
from .compose import score_folder
from .fid import FidScorer
from .generate import (
    TextToImage,
    check_out_folder,
    check_request,
    check_sampling,
    sample_geneval,
)
from .sweep_plots import plot_sweep

Score = Callable[[Path], float]  # generated folder -> FID against the held-out set's reference


@dataclass
class HeldOut:
    """What every point is scored on: captions for FID images, the real images, GenEval prompts (compositional)."""

    draw: list[dict]  # {"index", "caption"} of each FID image
    reference: Path  # real images at the model's resolution
    prompts: list[dict] | None = None  # GenEval metadata lines; None: FID only (COCO)
    images_per_prompt: int = 1


def parse_preset(preset: str) -> tuple[str, int]:
    """'SAMPLER:STEPS' -> (sampler, steps); a usage error names the preset and what is wrong with it."""
    sampler, sep, steps = preset.partition(":")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise UsageError(f"--presets {preset}: not SAMPLER:STEPS with STEPS a whole number of at least 1 "
                         "(e.g. heun:30)")
    try:
        sampler_spec(sampler)
    except UsageError as err:
        raise UsageError(f"--presets {preset}: {err}") from err
    return sampler, int(steps)


def grid(base: SamplingSettings, presets: list[str], guidances: list[float]) -> list[SamplingSettings]:
    """Every preset (SAMPLER:STEPS) at every guidance scale."""
    return [replace(base, sampler=s, steps=n, guidance=float(g)) for s, n in map(parse_preset, presets)
            for g in guidances]


def point_name(s: SamplingSettings) -> str:
    """Folder name of one sweep point."""
    return f"{s.sampler}_{s.steps}_g{s.guidance:g}"


def compose_heldout(scenes: str | Path, geneval: str | Path, num: int, images_per_prompt: int = 1) -> HeldOut:
    """The compositional held-out set: a scenes folder (<id>.png + <id>.txt, `data compose --layout flat`) whose
    first `num` captions are drawn for FID against all its images, and a GenEval-layout folder of prompts
    (`data compose --layout geneval`: its evaluation_metadata.jsonl)."""
    scenes = Path(scenes)
    captions = sorted(scenes.glob("*.txt"))
    if not captions:
        raise UsageError(f"{scenes} holds no <id>.txt captions (write it with micro-diffusion data compose "
                         "--layout flat)")
    draw = [{"index": i, "caption": p.read_text(encoding="utf-8").strip()} for i, p in enumerate(captions[:num])]
    metadata = Path(geneval) / "evaluation_metadata.jsonl"
    if not metadata.is_file():
        raise UsageError(f"{metadata} does not exist (write the folder with micro-diffusion data compose --layout "
                         "geneval)")
    return HeldOut(draw, scenes, read_prompts_file(metadata), images_per_prompt)


def sweep(points: list[SamplingSettings], held: HeldOut, out: Path, make_render: Callable[[SamplingSettings], Render],
          score: Score, flops: Callable[[SamplingSettings], int], reference: SamplingSettings,
          batch_size: int = 16) -> list[dict[str, Any]]:
    """Generate (resumably) and score every point once, in order; returns the points' records (relative_cost: a
    point's FLOPs over those of the `reference` settings, the model family's default sampling)."""
    records: dict[str, dict[str, Any]] = {}
    for settings in points:
        name = point_name(settings)
        saved = out / name / SWEEP_POINT
        if name in records:
            continue
        if saved.is_file():
            records[name] = json.loads(saved.read_text())
            continue
        render = make_render(settings)
        start = time.perf_counter()
        made = len(generate_missing(held.draw, out / name / "fid", render, batch_size=batch_size))
        if held.prompts is not None:
            made += sample_geneval(render, held.prompts, out / name / "geneval", held.images_per_prompt,
                                   batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - start
        cost = flops(settings)
        record = {**settings.to_dict(), "flops_per_image": int(cost),
                  "relative_cost": cost / flops(reference),
                  "images_per_s": made / seconds if made else float("nan"),  # nan: images were on disk already
                  "fid": float(score(out / name / "fid"))}
        if held.prompts is not None:
            scores = score_folder(out / name / "geneval", trust=False)
            record["geneval"] = {"overall": scores["overall"], **{k: v["accuracy"] for k, v in scores["tasks"].items()}}
        write_text_atomic(saved, json.dumps(record, indent=2) + "\n")
        records[name] = record
    return [records[point_name(s)] for s in points]


def model_sweep(render: TextToImage, points: list[SamplingSettings], held: HeldOut, out: Path,
                batch_size: int = 16) -> list[dict[str, Any]]:
    """The sweep of one loaded model: one network serves every point, only its sampling settings change."""

    def flops(s: SamplingSettings) -> int:
        return render.family.sample_flops(render.net, render.latent_hw, render.text.caption_len, s)

    def make_render(s: SamplingSettings) -> Render:
        check_sampling(render.config, s, render.where)
        render.settings = s
        return render

    scorer: list[FidScorer] = []  # built on the first point that needs scoring (none when every point is saved)

    def score(folder: Path) -> float:
        if not scorer:
            scorer.append(FidScorer(held.reference, device=str(render.device)))
        return scorer[0](folder)

    reference = render.family.sampling_for(render.config["network"])
    return sweep(points, held, out, make_render, score, flops, reference, batch_size)


def run_sweep(model: str | Path, out: str | Path, presets: list[str], guidances: list[float], num: int = 5000,
              annotations: str | Path | None = None, images: str | Path | None = None,
              scenes: str | Path | None = None, geneval: str | Path | None = None, images_per_prompt: int = 1,
              seed: int = 0, use_ema: bool | None = None, device: str | None = None, batch_size: int = 16,
              guidance_interval: tuple[float, float] | None = None, draw_seed: int = DRAW_SEED) -> dict:
    """The grid on COCO (annotations + images) or on the compositional held-out set (scenes + geneval); writes
    sweep.json and sweep.png into `out`. guidance_interval: every point's (default: the export's)."""
    presets_given = [parse_preset(p) for p in presets]  # every argument is checked before anything loads
    check_counts(num=num, batch_size=batch_size, images_per_prompt=images_per_prompt)
    if not presets_given or not guidances:
        raise UsageError("--presets and --guidances each need at least one value")
    check_out_folder(out)
    if (scenes is None) != (geneval is None):
        raise UsageError("--scenes and --geneval go together (the compositional held-out set)")
    if scenes is None and (annotations is None or images is None):
        raise UsageError("a sweep scores on COCO (--annotations and --images) or on compositional scenes "
                         "(--scenes and --geneval)")
    out = Path(out)
    config, base = check_request(model, {"guidance_interval": guidance_interval}, use_ema)
    for sampler, steps in presets_given:  # another family's or a student's sampler, or back, before loading
        check_sampling(config, SamplingSettings(steps=steps, guidance=float(guidances[0]), sampler=sampler),
                       str(model))
    points = grid(base, presets, guidances)
    render = TextToImage(model, points[0], seed, use_ema, device)
    if scenes is not None:
        held = compose_heldout(scenes, geneval, num, images_per_prompt)
        source = {"scenes": str(scenes), "geneval": str(geneval), "images_per_prompt": images_per_prompt}
    else:
        draw = draw_captions(annotations, num, draw_seed)
        held = HeldOut(draw, out / f"reference_{num}")
        prepare_reference(draw, images, held.reference, render.resolution)
        source = {"annotations": str(annotations), "draw_seed": draw_seed}
    result = {"points": model_sweep(render, points, held, out, batch_size),
              "settings": {"model": str(model), **source, "num_fid_images": len(held.draw),
                           "resolution": render.resolution, "seed": seed,
                           "reference_preset": "{0.sampler}:{0.steps}".format(
                               render.family.sampling_for(render.config["network"])),
                           "weights": render.config["weights_file"],
                           "cost": "sample_flops_per_image (forward FLOPs x evaluations, x2 with guidance)"}}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SWEEP, json.dumps(result, indent=2) + "\n")
    plot_sweep({Path(model).name: [result["points"]]}, out / "sweep.png")
    return result
