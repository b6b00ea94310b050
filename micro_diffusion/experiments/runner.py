"""Run an experiment: its data once, every (variant, seed)'s stages one after another, then the same evaluation.

    DIR/data/            compositional scenes (train, held-out, GenEval-format prompts), converted and precomputed once
    DIR/runs/<variant>_s<seed>/stage<k>/   one Composer run folder a stage (ledger, metrics, checkpoints)
    DIR/runs/<variant>_s<seed>/eval/       the run's evaluation: metrics.json, and in points/<sampler>_<steps>_g<scale>/
                                           each sampling point's FID and GenEval-style samples and scores
    DIR/runs/<variant>_s<seed>/eval/curve/stage<k>_ba<step>/   with eval.geneval_points: the GenEval-style samples
                                           of that checkpoint and their score.json

Every step leaves its result on disk and is skipped when found: a finished run is reused, a killed stage resumes
from its last checkpoint (Composer's autoresume), so running the same command again finishes a killed experiment.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.convert import convert
from data_prep.precompute import precompute

from ..cost.ledger import read_records
from ..cost.report import load_run, spend_at
from ..data.compose import write_folder, write_geneval
from ..data.geneval import read_prompts_file
from ..diffusion.sampling import SamplingSettings
from ..encoders import load_vae
from ..eval.compose import score_folder, write_scores
from ..eval.generate import TextToImage, sample_geneval
from ..eval.sweep import compose_heldout, model_sweep
from ..recipe import RecipeError
from ..training import train
from ..training.export import export_run
from ..utils.atomic import write_text_atomic
from ..utils.run_folder import EVAL_METRICS, METRICS, STAGE_DONE, STEP, VAL_LOSS, checkpoint_dir, latest_checkpoint
from .plan import RunPlan, stage_dirs
from .spec import Experiment

VAL_BATCH = 32  # held-out latents a validation batch


def prepare_data(exp: Experiment, root: Path) -> Path:
    """Scenes, held-out scenes and prompts, converted to MDS and precomputed: the latents root every run reads."""
    data = root / "data"
    marker = data / "prepared.json"
    want = {"data": exp.data}
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved != want:
            raise RecipeError(f"{data} was prepared for {saved['data']}, the experiment asks for {exp.data}: "
                              f"give another --out, or delete {data}")
        return data / "latents"
    d = exp.data
    write_folder(data / "images" / "train", d["count"], seed=d["seed"], size=d["size"], split="train")
    write_folder(data / "images" / "val", d["heldout"], seed=d["seed"] + 1, size=d["size"], split="train")
    write_geneval(data / "prompts", exp.eval["geneval_prompts"], seed=d["seed"], size=d["size"], split="heldout",
                  images_per_prompt=1)
    for split in ("train", "val"):
        convert(data / "images" / split, data / "mds" / split, "folder", workers=0, min_size=d["size"])
        precompute(data / "mds" / split, data / "latents" / split, [d["size"]], vae=str(d["vae"]),
                   text_encoder=d["text_encoder"], caption_len=d["caption_len"], batch_size=256)
    # the reader's trust on these prompts (ground truth, shuffled, chance, through the VAE), once: prompts/scores.json
    write_scores(data / "prompts", vae=load_vae(str(d["vae"]), device="cpu"))
    write_text_atomic(marker, json.dumps(want, indent=2) + "\n")
    return data / "latents"


def stage_overrides(exp: Experiment, run: RunPlan, k: int, root: Path, latents: Path) -> dict[str, Any]:
    """The recipe overrides of stage k of a run: its variant's keys, steps, data, validation and run folder."""
    stage, dirs = run.stages[k], stage_dirs(root, run)
    e = exp.eval
    batch = min(VAL_BATCH, e["val_samples"])
    out = {**stage.overrides, "runs_root": str(dirs[k].parent), "stage": dirs[k].name, "stages": [],
           "data.root": str(latents), "data.streams": [{"local": "train"}], "data.val_streams": [{"local": "val"}],
           "train.max_duration": f"{stage.steps}ba", "eval.interval": f"{max(1, stage.steps // e['val_points'])}ba",
           "eval.sigmas": e["val_sigmas"], "eval.batch_size": batch, "eval.batches": e["val_samples"] // batch,
           "samples.interval": None, "checkpoint.save_interval": f"{max(1, stage.steps // 4)}ba",
           "checkpoint.keep": 1, "train.progress_bar": False}
    points = point_steps(run, e["geneval_points"])[k]
    if len(points) > 1:  # the checkpoints the GenEval-style curve scores are kept (and the last one resumes)
        out.update({"checkpoint.save_interval": f"{points[0]}ba", "checkpoint.keep": -1})
    if k:  # a later stage starts from the weights the one before ended with
        out.update({"init_from": None, "init_checkpoint": str(latest_checkpoint(dirs[k - 1]))})
    if exp.loggers:
        out["loggers"] = run_trackers(exp, run, k, root)
    return out


def run_trackers(exp: Experiment, run: RunPlan, k: int, root: Path) -> dict[str, dict[str, Any]]:
    """The experiment's trackers for stage k of a run: named after the run and stage, grouped by the experiment, and
    one MLflow store for all runs (DIR/mlruns) unless the file names one."""
    name = f"{run.name}-stage{k}"
    out = {tracker: dict(options) for tracker, options in exp.loggers.items()}
    if "mlflow" in out:
        m = out["mlflow"]
        m.update(run_name=m["run_name"] or name, tracking_uri=m["tracking_uri"] or (root / "mlruns").resolve().as_uri())
    if "wandb" in out:
        out["wandb"].update(name=out["wandb"]["name"] or name, group=out["wandb"]["group"] or exp.name)
    return out


def point_steps(run: RunPlan, points: int) -> list[list[int]]:
    """Steps of each stage whose checkpoint the GenEval-style curve scores, `points` in all, the last at the run's end:
    the first stage holds all but one a later stage (evenly spaced, ending at its end), a later stage its end."""
    first = max(1, points - (len(run.stages) - 1))
    every = max(1, run.stages[0].steps // first)
    steps = [[every * i for i in range(1, first)] + [run.stages[0].steps]]
    return steps + [[stage.steps] for stage in run.stages[1:]]


def point_checkpoint(folder: Path, step: int) -> Path:
    """The checkpoint a stage saved after `step` batches (Composer's ep<E>-ba<B>-rank0.pt)."""
    found = sorted(checkpoint_dir(folder).glob(f"ep*-ba{step}-rank0.pt"))
    if not found:
        raise RecipeError(f"{checkpoint_dir(folder)} has no checkpoint of step {step}, which the GenEval-style curve "
                          "scores: delete that run folder and run the experiment again")
    return found[-1]


def geneval_curve(exp: Experiment, run: RunPlan, dirs: list[Path], root: Path) -> list[dict[str, float]]:
    """The GenEval-style overall at eval.geneval_points checkpoints along the run, against cumulative training FLOPs
    (one image of each of the first point_prompts held-out prompts at the fixed sampling point; cached on disk)."""
    e = exp.eval
    if e["geneval_points"] < 2:
        return []
    prompts = read_prompts_file(root / "data" / "prompts" / "evaluation_metadata.jsonl")[:e["point_prompts"]]
    out, curve, flops0, steps0 = dirs[-1].parent / "eval" / "curve", [], 0, 0
    stages = zip(run.stages, dirs, point_steps(run, e["geneval_points"]), strict=True)
    for k, (stage, folder, steps) in enumerate(stages):
        for step in steps:
            point, saved = out / f"stage{k}_ba{step}", out / f"stage{k}_ba{step}" / "score.json"
            if not saved.is_file():
                model = export_run(point_checkpoint(folder, step), point / "model")
                render = TextToImage(model, fixed_point(exp, run.variant), int(exp.data["seed"]))
                sample_geneval(render, prompts, point / "geneval", 1, batch_size=64, progress=False)
                record = {"stage": k, "step": step, "steps": steps0 + step,
                          "flops": flops0 + step * run.batch * stage.flops_per_sample,
                          "geneval": score_folder(point / "geneval", trust=False)["overall"]}
                write_text_atomic(saved, json.dumps(record) + "\n")
                shutil.rmtree(point / "model")  # the score and samples stay; the checkpoint can export it again
            curve.append(json.loads(saved.read_text()))
        flops0 += stage.steps * run.batch * stage.flops_per_sample
        steps0 += stage.steps
    return curve


def train_run(exp: Experiment, run: RunPlan, root: Path, latents: Path) -> list[Path]:
    """Train a run's stages in order, skipping those already finished with the same settings; returns their folders."""
    dirs = stage_dirs(root, run)
    for k, stage in enumerate(run.stages):
        done, marker = dirs[k] / STAGE_DONE, {"steps": stage.steps, "overrides": stage.overrides}
        if done.is_file() and json.loads(done.read_text()) != marker:
            raise RecipeError(f"{dirs[k]} was trained with other settings than {exp.path} now gives it (see {done}): "
                              "delete that run folder, or give another --out")
        trained = read_records(dirs[k]) if dirs[k].is_dir() else []
        if done.is_file() or (trained and int(trained[-1]["batch"]) >= stage.steps):  # killed before its marker
            print(f"[experiment] {run.name} stage{k}: finished earlier, reused", flush=True)
            write_text_atomic(done, json.dumps(marker) + "\n")
            continue
        print(f"[experiment] {run.name} stage{k}: {stage.steps} steps", flush=True)
        train(exp.base_recipe, stage_overrides(exp, run, k, root, latents))
        write_text_atomic(done, json.dumps(marker) + "\n")
    return dirs


def val_curve(run: RunPlan, dirs: list[Path]) -> dict[str, list[float]]:
    """Validation loss of a run against its cumulative training FLOPs, dollars and steps, over all its stages."""
    curve: dict[str, list[float]] = {"steps": [], "flops": [], "usd": [], "val_loss": []}
    flops0 = usd0 = steps0 = 0.0
    for stage, folder in zip(run.stages, dirs, strict=True):
        ran = load_run(folder)
        rows = {int(r[STEP]): float(r[VAL_LOSS]) for r in ran.metrics if VAL_LOSS in r}
        steps = np.array(sorted(rows), dtype=float)
        usd = spend_at(ran, steps, "usd", totals="stage_totals")  # this stage's spend; earlier stages add usd0
        for step, spent in zip(sorted(rows), usd, strict=True):
            curve["steps"].append(steps0 + step)
            curve["flops"].append(flops0 + step * run.batch * stage.flops_per_sample)
            curve["usd"].append(usd0 + float(spent))
            curve["val_loss"].append(rows[step])
        end = float(spend_at(ran, np.array([stage.steps]), "usd", totals="stage_totals")[0])
        steps0 += stage.steps
        flops0 += stage.steps * run.batch * stage.flops_per_sample
        usd0 += end if np.isfinite(end) else 0.0
    if not curve["val_loss"]:
        raise RuntimeError(f"{dirs[-1] / METRICS} has no {VAL_LOSS}: the validation loss did not run")
    return curve


def fixed_point(exp: Experiment, variant: str) -> SamplingSettings:
    """The variant's fixed sampling point: its own `sampling` (another family's sampler), else eval.sampling."""
    return SamplingSettings(**(exp.variant(variant).sampling or exp.eval["sampling"]))


def sweep_points(exp: Experiment, variant: str) -> list[SamplingSettings]:
    """The sampling settings a variant's runs are evaluated at: the fixed point, or the sweep's grid (which holds
    it)."""
    fixed = fixed_point(exp, variant)
    grid = exp.eval["sweep"]
    if grid is None:
        return [fixed]
    return [replace(fixed, sampler=s, steps=n, guidance=g) for s in grid["samplers"] for n in grid["steps"]
            for g in grid["guidances"]]


def evaluate_run(exp: Experiment, run: RunPlan, dirs: list[Path], root: Path) -> dict[str, Any]:
    """FID against held-out real scenes and the GenEval-style score of the held-out prompts at the fixed sampling
    point, and at every point of the sweep when the experiment has one (cached on disk)."""
    out = dirs[-1].parent / "eval"
    saved = out / EVAL_METRICS
    if saved.is_file():
        return json.loads(saved.read_text())
    model = export_run(dirs[-1], out / "model")
    e, data = exp.eval, root / "data"
    held = compose_heldout(data / "images" / "val", data / "prompts", e["fid_images"], e["images_per_prompt"])
    points = sweep_points(exp, run.variant)
    render = TextToImage(model, points[0], int(exp.data["seed"]))
    records = model_sweep(render, points, held, out / "points", batch_size=64)
    fixed = records[points.index(fixed_point(exp, run.variant))]
    metrics = {"fid": fixed["fid"], "geneval": fixed["geneval"], "sampling": fixed_point(exp, run.variant).to_dict(),
               "flops_per_image": fixed["flops_per_image"], "images_per_s": fixed["images_per_s"],
               **({"sweep": records} if e["sweep"] else {})}
    write_text_atomic(saved, json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_experiment(exp: Experiment, plans: list[RunPlan], root: Path) -> list[dict[str, Any]]:
    """Every run trained and evaluated, in plan order; returns results.json's variant rows."""
    latents = prepare_data(exp, root)
    rows = []
    for run in plans:
        dirs = train_run(exp, run, root, latents)
        curve = val_curve(run, dirs)
        metrics = {"val_loss": curve["val_loss"][-1], **evaluate_run(exp, run, dirs, root)}
        rows.append({"name": run.variant, "seed": run.seed, "run_dir": str(dirs[-1].parent),
                     "steps": sum(s.steps for s in run.stages), "flops": run.flops,
                     "usd": curve["usd"][-1], "parameters": run.parameters, "metrics": metrics, "curve": curve,
                     "geneval_curve": geneval_curve(exp, run, dirs, root)})
    return rows
