"""`micro-diffusion experiment FILE`: train every variant of an experiment at equal compute, evaluate, judge claims."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..utils.argparsing import subparser
from ..utils.run_folder import RESULTS
from .plan import plan_runs
from .spec import load_experiment, only_variants


def run(args: argparse.Namespace) -> int:
    """Plan, run (reusing finished runs) and report an experiment; a bad file or a folder trained for other settings
    raises a RecipeError (a usage error: exit 2 through the console script)."""
    from .report import write_report
    from .runner import run_experiment

    exp = load_experiment(args.file, quick=args.quick)
    if args.variants:
        exp = only_variants(exp, args.variants)
    plans = plan_runs(exp, args.seeds)
    for p in plans:
        print(f"[experiment] {p.name}: {' + '.join(str(s.steps) for s in p.stages)} steps, {p.flops:.3g} FLOPs, "
              f"{p.parameters:,} parameters", flush=True)
    if args.dry_run:
        return 0
    out = Path(args.out) if args.out else Path("runs") / "experiments" / (exp.name + ("_quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    rows = run_experiment(exp, plans, out)
    page = write_report(exp, rows, out)
    for claim in json.loads((out / RESULTS).read_text())["claims"]:
        print(f"[experiment] {claim['name']}: {claim['verdict']} (gap {claim['gap']:.3g}, se {claim['se']:.3g})")
    print(f"[experiment] report: {page}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `experiment` subcommand."""
    p = subparser(sub, "experiment", help="train an experiment's variants at equal compute and judge its claims")
    p.add_argument("file", help="experiment file, e.g. recipes/experiments/masking.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (None: the file's)")
    p.add_argument("--variants", nargs="+", default=None, help="run and report only these variants (None: all; "
                   "claims between them are judged)")
    p.add_argument("--quick", action="store_true", help="the file's quick: sizes (the whole chain at a toy size)")
    p.add_argument("--out", default=None, help="experiment folder (None: runs/experiments/NAME, NAME_quick with "
                   "--quick)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their steps, write nothing")
    p.set_defaults(func=run)
