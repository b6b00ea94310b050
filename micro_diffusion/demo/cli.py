"""`micro-diffusion demo [--out DIR] [--fresh] [--quick] [--dry-run]`: the whole pipeline on CPU (`make demo`)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..utils.argparsing import renamed, subparser
from . import DEFAULT_ROOT, STEPS, step_marker

if TYPE_CHECKING:
    from .pipeline import DemoConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparser(subparsers, "demo", help="the whole pipeline end to end on CPU on generated shape scenes")
    p.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="demo folder")
    renamed(p, "--root", "--out")
    p.add_argument("--fresh", action="store_true", help="delete the demo folder first and start over")
    p.add_argument("--quick", action="store_true", help="every step at a tiny size: checks the pipeline in a minute")
    p.add_argument("--dry-run", action="store_true", help="print the demo's plan (config, steps, recipes) and exit "
                   "without writing anything")
    p.set_defaults(func=run)


def demo_plan(cfg: DemoConfig) -> dict[str, Any]:
    """What run_demo(cfg) would do, in order: its config, its steps and the recipe each training step reads."""
    from ..recipe import find_recipe

    recipes = {"train_masked": cfg.masked_recipe, "train_finetune": cfg.finetune_recipe,
               "train_distill": cfg.distill_recipe}
    steps = []
    for name in STEPS:
        step: dict[str, Any] = {"step": name, "reused": step_marker(cfg.root, name).is_file() and not cfg.fresh}
        if name in recipes:
            step.update(recipe=recipes[name], recipe_file=str(find_recipe(recipes[name])))
        steps.append(step)
    return {"config": {k: v if isinstance(v, (int, float, bool, list, dict)) else str(v)
                       for k, v in asdict(cfg).items()}, "steps": steps}


def run(args: argparse.Namespace) -> int:
    """Run (or finish) the demo; its pipeline imports Composer, Streaming and the encoders (seconds), hence here."""
    if args.out.exists() and not args.out.is_dir():  # checked before the pipeline's imports (seconds)
        raise UsageError(f"--out {args.out} is a file, not a folder: give the demo folder (default {DEFAULT_ROOT})")
    from .pipeline import DemoConfig, run_demo

    cfg = DemoConfig.quick(args.out, args.fresh) if args.quick else DemoConfig(root=args.out, fresh=args.fresh)
    if args.dry_run:
        print(json.dumps(demo_plan(cfg), indent=2))
        return 0
    run_demo(cfg)
    return 0
