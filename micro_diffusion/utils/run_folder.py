"""The layout of a run folder and of an exported model: every file name and every logged metric key, in one place.

A run folder (runs/<stage>/, written by `micro-diffusion train`):

    config.yaml                 resolved recipe, run plan, package version, git revision
    metrics.jsonl               one JSON line per step: {"step": n, "loss/train/total": ..., "val/loss": ...}
    metrics.superseded.jsonl    rows a resumed run logged again, moved aside (each step appears once in metrics.jsonl)
    cost.jsonl                  the cost ledger: one record per logging interval, with stage and chained totals
    bad_samples.jsonl           samples the loader skipped (data.skip_bad_samples)
    checkpoints/latest-rank0.pt Composer's link to the newest checkpoint
    samples/ba<N>.png           sample grids (samples.interval)
    eval.json                   evaluation results the dashboard plots (any eval*.json or eval/*.json)
    report.html                 the cost dashboard (micro-diffusion cost report)
    stage_done.json             an experiment's marker: the stage finished with these settings
    .micro_diffusion.lock       while a job writes the folder: its host, pid and command (utils.folder_lock)

An exported model (micro-diffusion export): model.safetensors, ema.safetensors (when EMA ran), config.json,
null_caption.npy and README.md (its model card). Writers and readers take the names from here; docs/interfaces.md
describes the contents.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .jsonl import read_jsonl

# run folder
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
COST = "cost.jsonl"
BAD_SAMPLES = "bad_samples.jsonl"
CHECKPOINTS = "checkpoints"
LATEST_CHECKPOINT = "latest-rank0.pt"  # Composer's symlink to a run's newest checkpoint (rank 0 holds the full state)
SAMPLES = "samples"
EVAL = "eval.json"
REPORT = "report.html"
STAGE_DONE = "stage_done.json"
LOCK = ".micro_diffusion.lock"  # one writer per folder (utils.folder_lock): inside it, or beside it for an export
MLRUNS = "mlruns"  # the trackers' folders (a recipe's loggers:): MLflow's file store, TensorBoard's event files, and
TENSORBOARD = "tensorboard"  # the folder W&B itself names for its local run (WANDB_MODE=offline: offline-run-*)
WANDB = "wandb"

# exported model
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
EXPORT_CONFIG = "config.json"
NULL_CAPTION = "null_caption.npy"
MODEL_CARD = "README.md"  # the Hub model card: documentation, not among the files config.json hashes

# what sampling and evaluation write beside their images (sample folders, eval folders, experiment folders)
SAMPLING_RECORD = "sampling.json"  # a GenEval-layout sample folder: model, settings, dtype, VAE
PROMPTS_RECORD = "prompts.json"  # a flat sample folder: model, settings and the prompts in image order
SCORES = "scores.json"  # GenEval-style scores of a GenEval-layout folder (eval compose)
EVAL_METRICS = "metrics.json"  # an evaluation's results (eval coco; an experiment run's eval/)
SWEEP = "sweep.json"  # a sampling sweep's settings and points (eval sweep)
SWEEP_POINT = "point.json"  # one sweep point's scores, cached in its folder
RESULTS = "results.json"  # an experiment's variants, metrics and verdicts

# metric keys, as logged to metrics.jsonl (and the ledger's "metrics")
STEP = "step"
TRAIN_LOSS = "loss/train/total"  # the key Composer gives the training loss
VAL_LOSS = "val/loss"
VAL_LOSS_EMA = "val/loss_ema"
BAD_SAMPLES_SKIPPED = "data/bad_samples"  # samples the loader skipped in a step
COST_PREFIX = "cost/"  # the ledger's metrics: cost/usd, cost/device_hours, cost/mfu, cost/stage_mfu, ...


def cost_key(name: str) -> str:
    """The logged key of a cost metric: "usd" -> "cost/usd"."""
    return COST_PREFIX + name


STAGE_MFU = cost_key("stage_mfu")  # this stage's FLOPs over its device-hours at the device's peak


def config_file(run_dir: str | Path) -> Path:
    """The run's resolved recipe and plan."""
    return Path(run_dir) / CONFIG


def metrics_file(run_dir: str | Path) -> Path:
    """The run's per-step metrics log."""
    return Path(run_dir) / METRICS


def cost_file(run_dir: str | Path) -> Path:
    """The run's cost ledger."""
    return Path(run_dir) / COST


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The run's default checkpoint folder (checkpoint.save_folder may name another)."""
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run that saved into its own folder."""
    return checkpoint_dir(run_dir) / LATEST_CHECKPOINT


def lock_file(folder: str | Path, beside: bool = False) -> Path:
    """A folder's lock file: inside it, or with `beside` next to it (`.NAME.micro_diffusion.lock`) for a folder that
    is replaced whole by a rename (an export)."""
    if not beside:
        return Path(folder) / LOCK
    folder = Path(os.path.abspath(folder))  # "." or "out/" named by the folder's own name; links are not followed
    return folder.parent / f".{folder.name}{LOCK}"


def samples_dir(run_dir: str | Path) -> Path:
    """The run's sample grids."""
    return Path(run_dir) / SAMPLES


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of the run's metrics.jsonl (empty when absent)."""
    path = metrics_file(run_dir)
    return read_jsonl(path) if path.is_file() else []


def metric_series(run_dir: str | Path, key: str) -> list[tuple[int | None, float]]:
    """(step, value) of every metrics row that holds `key`, in file order."""
    return [(row.get(STEP), float(row[key])) for row in read_metrics(run_dir) if key in row]
