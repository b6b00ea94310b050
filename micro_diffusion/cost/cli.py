"""Subcommands `micro-diffusion cost estimate` and `micro-diffusion cost report` (and the old top-level `report`,
kept only to say where it went)."""
from __future__ import annotations

import argparse
import json

from ..errors import UsageError
from ..recipe import parse_overrides
from ..utils.argparsing import renamed, subparser
from ..utils.run_folder import REPORT
from .estimate import check_cost_args, estimate_recipe, format_table, total_of
from .prices import DEVICES


def _estimate(args: argparse.Namespace) -> int:
    recipes = [a for a in args.recipes if "=" not in a]  # positional key=value arguments are overrides
    if not recipes:
        raise UsageError("give at least one recipe file before the key=value overrides")
    check_cost_args(args.devices, args.mfu, args.usd_per_device_hour)  # before any recipe is read
    overrides = parse_overrides([a for a in args.recipes if "=" in a])
    stages = [estimate_recipe(path, overrides, args.devices, args.device_type, args.mfu, args.usd_per_device_hour)
              for path in recipes]
    total = total_of(stages, args.devices)
    if args.json:
        keep = ("name", "steps", "global_batch", "resolution", "mask_ratio", "flops_per_sample", "flops",
                "device_hours", "days", "usd")
        doc = {"devices": args.devices, "device_type": args.device_type, "mfu": args.mfu,
               "stages": [{k: s.to_dict()[k] for k in keep} for s in stages],
               "total": {k: total.to_dict()[k] for k in ("flops", "device_hours", "days", "usd")}}
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(stages, total, args.devices, args.device_type, args.mfu))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report  # matplotlib: only this command needs it

    print(write_report(args.run_dirs, args.out))
    return 0


def _moved(args: argparse.Namespace) -> int:
    raise UsageError("`micro-diffusion report` moved: use `micro-diffusion cost report RUN [RUN ...] [--out FILE]`")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `cost` (with `estimate` and `report`) and the stub of the old top-level `report`."""
    cost = subparser(subparsers, "cost", help="training cost: estimates from FLOP counts, dashboards of run folders")
    cost_sub = cost.add_subparsers(dest="cost_command", required=True)
    est = subparser(cost_sub, "estimate", help="GPU-hours, days and dollars of stage recipes")
    est.add_argument("recipes", nargs="+", metavar="RECIPE or key.sub=value",
                     help="stage recipe YAML files, in order; arguments with '=' are recipe overrides applied to "
                          "every recipe, e.g. train.global_batch=1024")
    est.add_argument("--devices", type=int, default=8, help="devices the stages run on")
    est.add_argument("--device-type", default="h100", choices=sorted(k for k, v in DEVICES.items() if v.peak_tflops),
                     help="device kind, for its peak and price")
    est.add_argument("--mfu", type=float, default=0.4, help="share of the dense bf16 peak achieved")
    est.add_argument("--usd-per-device-hour", type=float, default=None,
                     help="price override (else MICRO_DIFFUSION_USD_PER_DEVICE_HOUR, else the price table)")
    est.add_argument("--json", action="store_true", help="print one JSON object with `stages` and `total`")
    renamed(est, "--set", "positional key=value overrides")
    est.set_defaults(func=_estimate)

    rep = subparser(cost_sub, "report", help="HTML cost dashboard of run folders")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN", help="run folders (runs/<stage>), in stage order")
    rep.add_argument("--out", default=None, help=f"HTML file to write (default: {REPORT} in the first run folder)")
    rep.set_defaults(func=_report)

    old = subparser(subparsers, "report", help="moved: use `micro-diffusion cost report`")
    old.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    old.set_defaults(func=_moved)
