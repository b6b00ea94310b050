"""Training one stage as a typed step: `train` (and `distill`) return a Run, `dry_run` returns the plan as text.

Called by the command line (training/cli.py), the demo, the experiment runner and the tests. Failures raise the
project's errors (micro_diffusion.errors): a bad recipe or missing input UsageError (RecipeError), damaged data
DataError, a non-finite loss NonFiniteLoss, a stop by SIGTERM Preempted (after its checkpoint was saved), a run folder
another job is writing Busy (utils.folder_lock).
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from micro_diffusion.cost.ledger import Totals, last_totals
from micro_diffusion.cost.memory import predict_stage
from micro_diffusion.data.inputs import missing_inputs
from micro_diffusion.errors import DataError, Preempted
from micro_diffusion.recipe import RecipeError, load_recipe
from micro_diffusion.training.cpu_malloc import keep_freed_memory
from micro_diffusion.training.run import RunPlan, check_inputs, parallelism, plan_run, run_info, write_run_info
from micro_diffusion.utils.folder_lock import hold
from micro_diffusion.utils.run_folder import LATEST_CHECKPOINT, config_file

Recipe = str | os.PathLike | Mapping[str, Any]  # a recipe file (find_recipe resolves it) or a recipe mapping


@dataclass(frozen=True)
class Run:
    """A finished training stage: its folder, final checkpoint and cost-ledger totals (None on ranks without it)."""

    stage: str
    recipe: dict[str, Any]  # the resolved recipe (as the run folder's config.yaml records it)
    run_dir: Path
    checkpoint: str  # the newest checkpoint: a path, or a URI when checkpoint.save_folder is remote
    stage_totals: Totals | None  # this stage's spend and progress (its cost.jsonl, global rank 0)
    totals: Totals | None  # with the stages it carried over (init_from)


@dataclass(frozen=True)
class Prediction:
    """What a dry run predicts memory and time for: GPUs, their kind, the assumed utilisation."""

    devices: int
    device_type: str = "h100"
    mfu: float = 0.4


def _load(recipe: Recipe, overrides: Mapping[str, Any] | None, distill: bool) -> dict:
    cfg = load_recipe(recipe, overrides)
    if distill and cfg["distill"] is None:
        raise RecipeError(f"{recipe if not isinstance(recipe, Mapping) else 'the recipe'} has no distill: section; "
                          "`micro-diffusion distill` runs a consistency distillation recipe (e.g. "
                          "recipes/distill_512.yaml)")
    return cfg


def dry_run(recipe: Recipe, overrides: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
            distill: bool = False, predict: Prediction | None = None) -> str:
    """The resolved recipe, run plan, version and git revision as YAML, then the missing inputs (and with `predict`
    the memory per device, step time and wall-clock on that many GPUs); nothing is written."""
    if predict is not None and (predict.devices < 1 or not 0 < predict.mfu <= 1):
        raise RecipeError(f"--devices must be positive and --mfu in (0, 1], got {predict.devices} and {predict.mfu}")
    cfg = _load(recipe, overrides, distill)
    if predict is not None and cfg["distill"] is not None:
        raise RecipeError("--devices predicts diffusion training stages; a distillation's teacher and JVP are "
                          "not in the memory model")
    plan = plan_run(cfg, out)
    lines = [yaml.safe_dump(run_info(cfg, plan), sort_keys=False).rstrip("\n")]
    problems = missing_inputs(cfg, plan.init_checkpoint)
    lines.append("# missing inputs (a real run stops on these):" if problems else "# all inputs found")
    lines += [f"#   {line}" for line in problems]
    if predict is not None:
        split = parallelism(cfg["train"]["parallelism"], "gpu", predict.devices)
        lines += predict_stage(cfg, predict.devices, predict.device_type, predict.mfu, split)
    return "\n".join(lines) + "\n"


def train(recipe: Recipe, overrides: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
          distill: bool = False) -> Run:
    """Train one stage (resuming its run folder when it holds a checkpoint) and return the finished Run.

    Args:
        recipe: a recipe file (relative to the current folder, else to the repository's recipes/) or mapping.
        overrides: {dotted key: value}, e.g. {"train.max_duration": "3ba"}, applied over the recipe.
        out: the run folder (default: runs_root/stage of the recipe).
        distill: insist on a recipe with a `distill:` section (what `micro-diffusion distill` runs).
    """
    cfg = _load(recipe, overrides, distill)
    plan = plan_run(cfg, out)
    info = run_info(cfg, plan)
    check_inputs(cfg, plan)
    # One writer per run folder: a second job stops here, naming the holder, before Composer is imported.
    with hold(plan.run_dir, "distill" if cfg["distill"] is not None else "train"):
        _fit(cfg, plan, info)
    ledger = last_totals(plan.run_dir)
    return Run(stage=cfg["stage"], recipe=cfg, run_dir=Path(plan.run_dir),
               checkpoint=f"{plan.save_folder}/{LATEST_CHECKPOINT}", stage_totals=ledger[0] if ledger else None,
               totals=ledger[1] if ledger else None)


def distill(recipe: Recipe, overrides: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None) -> Run:
    """Distil a trained model into a consistency student: train() of a recipe with a `distill:` section."""
    return train(recipe, overrides, out, distill=True)


def _fit(cfg: dict, plan: RunPlan, info: dict) -> None:
    # Composer and the modules built on it import in seconds: only a real run pays for them.
    from composer.utils import dist

    from micro_diffusion.data.dataset import BadSampleError, bad_sample_message
    from micro_diffusion.data.shm import remove_dead_leftovers
    from micro_diffusion.training.builder import build_trainer
    from micro_diffusion.training.callbacks import Preemption

    # Registered before the loaders exist, so it runs after Streaming's own exit handlers have unlinked their shared
    # memory: it then removes the file locks they leave in the temp folder (and anything a dead worker left).
    atexit.register(remove_dead_leftovers)
    if plan.device == "cpu":
        keep_freed_memory()  # each step re-allocates its gradients; see cpu_malloc
    if dist.get_global_rank() == 0:
        write_run_info(info, plan.run_dir)
        print(f"run folder {plan.run_dir} (resolved recipe in {config_file(plan.run_dir)})", flush=True)
    trainer = build_trainer(cfg, plan)  # a damaged shard raises DamagedShardError, a DataError
    try:
        trainer.fit()
    except BadSampleError as err:  # raised in a loader worker, re-raised here with the worker's traceback as text
        raise DataError(bad_sample_message(err)) from err
    finally:
        trainer.close()
    preempt = next(cb for cb in trainer.state.callbacks if isinstance(cb, Preemption))
    if preempt.stopped_at is not None:
        raise Preempted(f"preempted: checkpoint saved at batch {preempt.stopped_at} in {plan.save_folder}; "
                        "rerun the same command to resume")
