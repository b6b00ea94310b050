"""The demo's Fluid model, scored as the MicroDiT teacher is: caption match, GenEval-style, FID, images/s, FLOPs."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from micro_diffusion.eval.coco import generate_missing
from micro_diffusion.eval.generate import TextToImage, export_config, settings_for

from .distilled import images_per_s, stage_flops


def score_fluid(root: Path, captions: list[str], model_dir: Path, seed: int, evaluate: Callable[[Path], dict],
                run_dir: str) -> dict:
    """Generate the held-out captions with the Fluid export at its recorded sampling settings and score them."""
    render = TextToImage(model_dir, settings_for(export_config(model_dir)), seed)
    out = root / "eval" / "fluid"
    generate_missing([{"index": i, "caption": c} for i, c in enumerate(captions)], out, render, batch_size=64)
    scores = evaluate(out)
    match = scores["caption_match"]
    return {"caption_match": match["value"], "caption_match_chance": match["chance"],
            "geneval": scores["geneval"]["overall"], "fid": scores["fid"]["value"],
            "images_per_s": images_per_s(render, captions), "train_flops": stage_flops(run_dir),
            "sampling": render.settings.to_dict()}
