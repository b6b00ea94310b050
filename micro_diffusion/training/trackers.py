"""Experiment trackers named in a recipe's `loggers:` block, built as Composer's own logger destinations.

Composer sends every logger what the run logs: its losses, learning rate and throughput, the cost ledger's metrics,
the validation loss, the sample grids (log_images) and the resolved recipe (log_hyperparameters, flattened here).
Folders left null go into the run folder, so a run's tracker files sit beside its metrics.jsonl (docs/trackers.md).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from composer.core import State
from composer.loggers import Logger, LoggerDestination, MLFlowLogger, TensorboardLogger, WandBLogger
from composer.loggers.logger import format_log_data_value
from composer.utils import dist

from micro_diffusion.recipe import RecipeError
from micro_diffusion.utils.run_folder import MLRUNS, TENSORBOARD


def mlflow_logger(options: dict[str, Any], run_dir: Path) -> MLFlowLogger:
    """MLflow; a null tracking_uri is a file store in the run folder."""
    uri = options["tracking_uri"] or (run_dir / MLRUNS).resolve().as_uri()
    if uri.startswith("file:"):  # MLflow 3 refuses its file store (in maintenance) unless this opts in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=uri, experiment_name=options["experiment_name"], run_name=options["run_name"],
                        tags=dict(options["tags"] or {}), log_system_metrics=options["log_system_metrics"])


class TensorboardTracker(TensorboardLogger):
    """Composer's TensorboardLogger with its HPARAMS entry written at the end of training too (Composer writes it at
    an evaluation's end only, and these runs have none) and the values kept as logged (Composer turns floats into
    text of 4 decimals: a learning rate of 2.4e-4 would read 0.0002)."""

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        if self.rank_zero_only and dist.get_global_rank() != 0:
            return
        self.hyperparameters.update({k: v if isinstance(v, (str, int, float, bool)) else format_log_data_value(v)
                                     for k, v in hyperparameters.items()})

    def fit_end(self, state: State, logger: Logger) -> None:
        self.eval_end(state, logger)  # the hyperparameters beside the latest losses, then Composer's flush


def tensorboard_logger(options: dict[str, Any], run_dir: Path) -> TensorboardLogger:
    """TensorBoard event files under log_dir/<stage>/ (log_dir null: the run folder's tensorboard/)."""
    return TensorboardTracker(log_dir=options["log_dir"] or str(run_dir / TENSORBOARD),
                              flush_interval=options["flush_interval"])


class WandBTracker(WandBLogger):
    """Composer's WandBLogger, never asked for a checkpoint: a run's checkpoints live in its save folder, not in W&B
    artifacts, and on a fresh start Composer's autoresume asks every logger for one, which in WandBLogger queries W&B's
    API (an error without an API key, offline runs included)."""

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        raise NotImplementedError("checkpoints are read from the run's save folder, not from W&B")


def wandb_logger(options: dict[str, Any], run_dir: Path) -> WandBLogger:
    """Weights & Biases; its local files (the offline run with WANDB_MODE=offline) go to the run folder's wandb/
    (W&B names that folder itself)."""
    run_dir.mkdir(parents=True, exist_ok=True)  # wandb.init needs its folder to exist
    return WandBTracker(project=options["project"], entity=options["entity"], name=options["name"],
                        group=options["group"], tags=list(options["tags"]), init_kwargs={"dir": str(run_dir)})


BUILDERS: dict[str, Callable[[dict[str, Any], Path], LoggerDestination]] = {
    "mlflow": mlflow_logger, "tensorboard": tensorboard_logger, "wandb": wandb_logger}  # each needs its package


def build_trackers(loggers: Mapping[str, dict[str, Any]], run_dir: str | Path) -> list[LoggerDestination]:
    """Composer's logger of each tracker in a validated `loggers:` block; a missing package is an error naming it."""
    out = []
    for name, options in loggers.items():
        try:
            out.append(BUILDERS[name](options, Path(run_dir)))
        except ImportError as err:  # Composer's MissingConditionalImportError is one
            raise RecipeError(f"loggers.{name}: the {name} package is not installed ({err}); install "
                              "requirements.lock (make install) or `pip install -e .[trackers]`") from err
    return out


def flatten(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The recipe as {dotted key: value}: sections opened, lists, empty sections and nulls as JSON text (what every
    tracker takes as a hyperparameter)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in recipe.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{dotted}."))
        elif isinstance(value, (str, int, float, bool)):
            out[dotted] = value
        else:
            out[dotted] = json.dumps(value)
    return out
