"""The `micro-diffusion` console script: one entry point, one subcommand per stage of the pipeline.

Every subcommand runs through errors.exit_with: a project error becomes one line `micro-diffusion CMD: message` on
stderr and its exit code (1 a step failed, 2 usage, 3 non-finite loss, 4 damaged data, 143 preempted; see
docs/exit-codes.md); argparse's own usage errors exit 2 as well.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .cost.cli import register as register_cost
from .data.cli import register as register_data
from .demo.cli import register as register_demo
from .errors import exit_with
from .eval.cli import register as register_eval
from .experiments.cli import register as register_experiment
from .families import FAMILIES
from .training.cli import register as register_train
from .utils.argparsing import parser as new_parser
from .utils.argparsing import subparser
from .version import __version__


def _presets(args: argparse.Namespace) -> int:
    for fam in FAMILIES.values():
        for name in fam.presets:
            with torch.device("meta"):
                net = fam.create(name)
            print(f"{name:18s} {fam.name:6s} {sum(p.numel() for p in net.parameters()) / 1e6:9.1f}M parameters")
    return 0


def _import_reference(args: argparse.Namespace) -> int:
    from .reference import import_reference  # the converter needs torch's loader only when asked

    out, summary = import_reference(args.checkpoint, args.out, args.in_channels, args.latent_size)
    skipped = ", ".join(f"{k} ({n} tensors)" for k, n in summary["skipped_subtrees"].items()) or "none"
    print(f"converted the {summary['tensors']} DiT tensors of {summary['preset']} ({summary['in_channels']} channels, "
          f"positions uninterpolated at a {summary['pos_base_grid']}-patch grid) into {out}; other subtrees "
          f"left out: {skipped}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; each subcommand registers its own arguments."""
    parser = new_parser("micro-diffusion", __doc__)
    parser.add_argument("--version", action="version", version=f"micro_diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    subparser(sub, "presets", help="list model presets and their sizes").set_defaults(func=_presets)
    ref = subparser(sub, "import-reference", help="the paper's released weights as an exported-model folder")
    ref.add_argument("checkpoint", help="a released .pt file, local or hf://VSehwag24/MicroDiT/ckpts/NAME.pt")
    ref.add_argument("--out", required=True, help="export folder to write")
    ref.add_argument("--in-channels", type=int, choices=(4, 16), help="VAE channels (None: the file's)")
    ref.add_argument("--latent-size", type=int, help="latent side to sample at (None: the file's, 64)")
    ref.set_defaults(func=_import_reference)
    register_data(sub)
    for register in (register_train, register_cost, register_eval, register_experiment, register_demo):
        register(sub)
    return parser


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The prog of the subcommand that parsed args, e.g. `micro-diffusion eval fid`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return command_name(action.choices[getattr(args, action.dest)], args)
    return parser.prog


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; a project error exits with its code and one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return exit_with(command_name(parser, args), lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
