"""`micro-diffusion train RECIPE [key.sub=value ...] [--dry-run] [--run-dir DIR]`."""
from __future__ import annotations

import argparse
import atexit
import sys
from dataclasses import dataclass

import yaml

from micro_diffusion.cost.memory import predict_stage
from micro_diffusion.cost.prices import DEVICES
from micro_diffusion.recipe import RecipeError, load_recipe, missing_inputs
from micro_diffusion.training.cpu_malloc import keep_freed_memory
from micro_diffusion.training.run import RunPlan, _parallelism, check_inputs, plan_run, run_info, write_run_info

PREEMPTED_EXIT = 143  # 128 + SIGTERM: the job was stopped, not finished; rerun the same command to resume
NAN_EXIT = 3  # the loss went NaN/inf: the last checkpoint is the last good one
DATA_EXIT = 4  # damaged data: a shard that fails its size/hash check, or a bad sample (named on stderr)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `distill` subcommands."""
    launch = "Launch on several devices with Composer's launcher: composer -n 8 -m micro_diffusion.cli {} RECIPE ..."
    for name, helptext, example in [
            ("train", "train one stage from a YAML recipe (Composer)", "recipes/res256_masked.yaml"),
            ("distill", "distil a trained model into a 1-4 step consistency student", "recipes/distill_512.yaml")]:
        p = subparsers.add_parser(name, help=helptext, description=f"{helptext}. {launch.format(name)}")
        p.add_argument("recipe", help=f"recipe file, e.g. {example}")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="recipe overrides, values parsed as YAML (e.g. train.max_duration=100ba)")
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved recipe, run plan, version and git revision, list missing inputs, exit")
        p.add_argument("--devices", type=int, default=None,
                       help="with --dry-run: predict peak memory per device, step time and stage wall-clock on this "
                            "many GPUs (a short probe on the CPU measures the activations)")
        p.add_argument("--device-type", default="h100", choices=sorted(k for k, v in DEVICES.items() if v.peak_tflops),
                       help="with --devices: the GPU kind, for its peak and memory (default h100)")
        p.add_argument("--mfu", type=float, default=0.4,
                       help="with --devices: share of the dense bf16 peak the step time assumes (default 0.4)")
        p.add_argument("--run-dir", default=None, help="run folder (default: RUNS_ROOT/STAGE from the recipe)")
        p.set_defaults(func=lambda args, distill=name == "distill": train(
            args.recipe, args.overrides, args.run_dir, args.dry_run, distill,
            None if args.devices is None else Prediction(args.devices, args.device_type, args.mfu)))


@dataclass(frozen=True)
class Prediction:
    """What a dry run predicts memory and time for: GPUs, their kind, the assumed utilisation."""

    devices: int
    device_type: str
    mfu: float


def train(recipe: str, overrides: list[str] | None = None, run_dir: str | None = None, dry_run: bool = False,
          distill: bool = False, predict: Prediction | None = None) -> int:
    """Resolve a recipe, then print it (dry run) or train the stage; returns the command's exit code.

    distill=True (the `distill` command) insists on a recipe with a `distill:` section; `train` runs either kind.
    predict (dry runs only) adds the predicted memory per device, step time and stage wall-clock.
    """
    try:
        if predict is not None and not dry_run:
            raise RecipeError("--devices predicts memory and time in a dry run only: add --dry-run")
        if predict is not None and (predict.devices < 1 or not 0 < predict.mfu <= 1):
            raise RecipeError(f"--devices must be positive and --mfu in (0, 1], got {predict.devices} and "
                              f"{predict.mfu}")
        cfg = load_recipe(recipe, overrides)
        if distill and cfg["distill"] is None:
            raise RecipeError(f"{recipe} has no distill: section; `micro-diffusion distill` runs a consistency "
                              "distillation recipe (e.g. recipes/distill_512.yaml)")
        if predict is not None and cfg["distill"] is not None:
            raise RecipeError("--devices predicts diffusion training stages; a distillation's teacher and JVP are "
                              "not in the memory model")
        plan = plan_run(cfg, run_dir)
        info = run_info(cfg, plan)
        if dry_run:
            print(yaml.safe_dump(info, sort_keys=False), end="")
            problems = missing_inputs(cfg, plan.init_checkpoint)
            print("# missing inputs (a real run stops on these):" if problems else "# all inputs found")
            for line in problems:
                print(f"#   {line}")
            if predict is not None:
                parallelism = _parallelism(cfg["train"]["parallelism"], "gpu", predict.devices)
                print("\n".join(predict_stage(cfg, predict.devices, predict.device_type, predict.mfu, parallelism)))
            return 0
        check_inputs(cfg, plan)
    except RecipeError as err:
        print(f"micro-diffusion train: {err}", file=sys.stderr)
        return 2
    return _fit(cfg, plan, info)


def _fit(cfg: dict, plan: RunPlan, info: dict) -> int:
    # Composer and the modules built on it import in seconds: only a real run pays for them.
    from composer.utils import dist

    from micro_diffusion.data.dataset import BadSampleError, bad_sample_message
    from micro_diffusion.data.integrity import DamagedShardError
    from micro_diffusion.data.shm import remove_dead_leftovers
    from micro_diffusion.training.builder import build_trainer
    from micro_diffusion.training.callbacks import NonFiniteLossError, Preemption

    # Registered before the loaders exist, so it runs after Streaming's own exit handlers have unlinked their shared
    # memory: it then removes the file locks they leave in the temp folder (and anything a dead worker left).
    atexit.register(remove_dead_leftovers)
    if plan.device == "cpu":
        keep_freed_memory()  # each step re-allocates its gradients; see cpu_malloc
    if dist.get_global_rank() == 0:
        path = write_run_info(info, plan.run_dir)
        print(f"run folder {plan.run_dir} (resolved recipe in {path})", flush=True)
    try:
        trainer = build_trainer(cfg, plan)
    except DamagedShardError as err:
        print(f"micro-diffusion train: {err}", file=sys.stderr, flush=True)
        return DATA_EXIT
    try:
        trainer.fit()
    except NonFiniteLossError as err:
        print(f"micro-diffusion train: {err}", file=sys.stderr, flush=True)
        trainer.close()
        return NAN_EXIT
    except BadSampleError as err:  # raised in a loader worker, re-raised here with the worker's traceback as text
        print(f"micro-diffusion train: {bad_sample_message(err)}", file=sys.stderr, flush=True)
        trainer.close()
        return DATA_EXIT
    preempt = next(cb for cb in trainer.state.callbacks if isinstance(cb, Preemption))
    trainer.close()
    if preempt.stopped_at is not None:
        print(f"preempted: checkpoint saved at batch {preempt.stopped_at} in {plan.save_folder}; "
              "rerun the same command to resume", flush=True)
        return PREEMPTED_EXIT
    return 0
