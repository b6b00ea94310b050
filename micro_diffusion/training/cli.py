"""`micro-diffusion train RECIPE [key.sub=value ...] [--out DIR] [--dry-run]` (and `distill`): parse, then call the
step functions of micro_diffusion.training.stage; exit codes come from the errors they raise (docs/exit-codes.md)."""
from __future__ import annotations

import argparse

from micro_diffusion.cost.prices import DEVICES
from micro_diffusion.recipe import RecipeError, parse_overrides
from micro_diffusion.training.stage import Prediction, dry_run, train
from micro_diffusion.utils.argparsing import renamed, subparser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `distill` subcommands."""
    launch = "Launch on several devices with Composer's launcher: composer -n 8 -m micro_diffusion.cli {} RECIPE ..."
    for name, helptext, example in [
            ("train", "train one stage from a YAML recipe (Composer)", "recipes/res256_masked.yaml"),
            ("distill", "distil a trained model into a 1-4 step consistency student", "recipes/distill_512.yaml")]:
        p = subparser(subparsers, name, help=helptext, description=f"{helptext}. {launch.format(name)}")
        p.add_argument("recipe", help=f"recipe file, e.g. {example} (else looked up in the repository's recipes/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="recipe overrides, values parsed as YAML (e.g. train.max_duration=100ba)")
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved recipe, run plan, version and git revision, list missing inputs, exit")
        p.add_argument("--devices", type=int, default=None,
                       help="with --dry-run: predict peak memory per device, step time and stage wall-clock on this "
                            "many GPUs (a short probe on the CPU measures the activations)")
        p.add_argument("--device-type", default="h100", choices=sorted(k for k, v in DEVICES.items() if v.peak_tflops),
                       help="with --devices: the GPU kind, for its peak and memory")
        p.add_argument("--mfu", type=float, default=0.4,
                       help="with --devices: share of the dense bf16 peak the step time assumes")
        p.add_argument("--out", default=None, help="run folder (default: RUNS_ROOT/STAGE from the recipe)")
        renamed(p, "--run-dir", "--out")
        p.set_defaults(func=_run, distill=name == "distill")


def _run(args: argparse.Namespace) -> int:
    """One train or distill command: a dry run prints its plan, a real run trains the stage."""
    if args.devices is not None and not args.dry_run:
        raise RecipeError("--devices predicts memory and time in a dry run only: add --dry-run")
    overrides = parse_overrides(args.overrides)
    if args.dry_run:
        predict = None if args.devices is None else Prediction(args.devices, args.device_type, args.mfu)
        print(dry_run(args.recipe, overrides, args.out, args.distill, predict), end="")
        return 0
    run = train(args.recipe, overrides, args.out, args.distill)
    print(f"finished {run.stage}: run folder {run.run_dir}, checkpoint {run.checkpoint}", flush=True)
    return 0
