"""The demo's distilled student beside its teacher: caption match, GenEval-style score, FID and images/s."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from micro_diffusion.cost.ledger import last_totals
from micro_diffusion.diffusion.sampling import SamplingSettings
from micro_diffusion.eval.coco import generate_missing
from micro_diffusion.eval.generate import TextToImage

STUDENT_STEPS = (1, 2, 4)
SPEED_BATCH = 64  # images per timed batch, the same for teacher and student


def images_per_s(render: TextToImage, captions: list[str], repeats: int = 2) -> float:
    """Sampling speed on one batch of caption embeddings (text encoding and VAE decoding excluded), best of repeats."""
    batch = captions[:SPEED_BATCH]
    emb = render.text.encode(batch).to(render.device)  # (B, L, D)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        render.sample(emb, list(range(len(batch))))
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def stage_flops(run_dir: str | Path) -> float:
    """The FLOPs a finished stage trained with, from its cost ledger."""
    totals = last_totals(run_dir)
    if totals is None:
        raise FileNotFoundError(f"{run_dir} has no cost ledger")
    return float(totals[0].flops)


def score_student(root: Path, captions: list[str], teacher: TextToImage, student_dir: Path, seed: int,
                  teacher_eval: dict, evaluate: Callable[[Path], dict], teacher_runs: list[str],
                  student_run: str) -> dict:
    """Generate the held-out captions with the student at each step count, score them as the teacher was scored."""
    draw = [{"index": i, "caption": c} for i, c in enumerate(captions)]
    steps = {}
    for k in STUDENT_STEPS:
        render = TextToImage(student_dir, SamplingSettings(steps=k, guidance=1.0, sampler="consistency"), seed)
        out = root / "eval" / f"student_{k}step"
        generate_missing(draw, out, render, batch_size=64)
        scores = evaluate(out)
        steps[str(k)] = {"caption_match": scores["caption_match"]["value"], "fid": scores["fid"]["value"],
                         "geneval": scores["geneval"]["overall"], "images_per_s": images_per_s(render, captions)}
    teacher_entry = {"caption_match": teacher_eval["caption_match"]["value"], "fid": teacher_eval["fid"]["value"],
                     "geneval": teacher_eval["geneval"]["overall"], "images_per_s": images_per_s(teacher, captions),
                     "sampling": teacher.settings.to_dict()}
    return {"steps": steps, "teacher": teacher_entry, "distill_flops": stage_flops(student_run),
            "teacher_train_flops": sum(stage_flops(r) for r in teacher_runs), "speed_batch": SPEED_BATCH}
