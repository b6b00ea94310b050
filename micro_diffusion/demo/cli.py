"""`micro-diffusion demo [--root DIR] [--fresh] [--quick]`: the whole pipeline on CPU (what `make demo` runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import DEFAULT_ROOT


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser("demo", help="the whole pipeline end to end on CPU on the embedded shapes dataset")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"output folder (default {DEFAULT_ROOT})")
    p.add_argument("--fresh", action="store_true", help="delete the demo folder first and start over")
    p.add_argument("--quick", action="store_true", help="every step at a tiny size: checks the pipeline in a minute")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run (or finish) the demo; its pipeline imports Composer, Streaming and the encoders (seconds), hence here."""
    from .pipeline import DemoConfig, run_demo

    cfg = DemoConfig.quick(args.root, args.fresh) if args.quick else DemoConfig(root=args.root, fresh=args.fresh)
    run_demo(cfg)
    return 0
