"""Subcommands `micro-diffusion cost estimate` and `micro-diffusion report`."""
from __future__ import annotations

import argparse
import json

from .estimate import estimate_recipe, format_table, total_of
from .prices import DEVICES
from .report import write_report


def _estimate(args: argparse.Namespace) -> int:
    stages = [estimate_recipe(path, args.set, args.devices, args.device_type, args.mfu, args.usd_per_device_hour)
              for path in args.recipes]
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
    print(write_report(args.run_dirs, args.out))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `cost` (with `estimate`) and `report` to the console script's subcommands."""
    cost = subparsers.add_parser("cost", help="training cost: estimates from FLOP counts")
    cost_sub = cost.add_subparsers(dest="cost_command", required=True)
    est = cost_sub.add_parser("estimate", help="GPU-hours, days and dollars of stage recipes")
    est.add_argument("recipes", nargs="+", help="stage recipe YAML files, in order")
    est.add_argument("--devices", type=int, default=8, help="devices the stages run on (default 8)")
    est.add_argument("--device-type", default="h100", choices=sorted(k for k, v in DEVICES.items() if v.peak_tflops),
                     help="device kind, for its peak and price (default h100)")
    est.add_argument("--mfu", type=float, default=0.4, help="share of the dense bf16 peak achieved (default 0.4)")
    est.add_argument("--usd-per-device-hour", type=float, default=None,
                     help="price override (else MICRO_DIFFUSION_USD_PER_DEVICE_HOUR, else the price table)")
    est.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="recipe override applied to every recipe, e.g. train.global_batch=1024 (repeatable)")
    est.add_argument("--json", action="store_true", help="print one JSON object with `stages` and `total`")
    est.set_defaults(func=_estimate)

    rep = subparsers.add_parser("report", help="HTML cost dashboard of run folders")
    rep.add_argument("run_dirs", nargs="+", help="run folders (runs/<stage>), in stage order")
    rep.add_argument("--out", default=None, help="HTML file to write (default: report.html in the first run folder)")
    rep.set_defaults(func=_report)
