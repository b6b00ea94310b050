"""The `micro-diffusion` console script: one entry point, one subcommand per stage of the pipeline."""
from __future__ import annotations

import argparse
import sys

import torch

from .cost.cli import register as register_cost
from .data.cli import register as register_data
from .demo.cli import register as register_demo
from .eval.cli import register as register_eval
from .experiments.cli import register as register_experiment
from .models import create_dit, list_presets
from .training.cli import register as register_train
from .version import __version__


def _presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        with torch.device("meta"):
            net = create_dit(name)
        print(f"{name:18s} {sum(p.numel() for p in net.parameters()) / 1e6:9.1f}M parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; each subcommand registers its own arguments."""
    parser = argparse.ArgumentParser(prog="micro-diffusion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"micro_diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list model presets and their sizes").set_defaults(func=_presets)
    register_data(sub)
    for register in (register_train, register_cost, register_eval, register_experiment, register_demo):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
