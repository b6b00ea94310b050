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
    parser = argparse.ArgumentParser(prog="micro-diffusion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"micro_diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list model presets and their sizes").set_defaults(func=_presets)
    ref = sub.add_parser("import-reference", help="the paper's released weights as an exported-model folder")
    ref.add_argument("checkpoint", help="a released .pt file, local or hf://VSehwag24/MicroDiT/ckpts/NAME.pt")
    ref.add_argument("--out", required=True, help="export folder to write")
    ref.add_argument("--in-channels", type=int, choices=(4, 16), help="VAE channels (default: the file's)")
    ref.add_argument("--latent-size", type=int, help="latent side to sample at (default: the file's, 64)")
    ref.set_defaults(func=_import_reference)
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
