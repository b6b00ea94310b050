"""`micro-diffusion data ...`: the data layer's command group. Each command parses its arguments, calls its step
function (compose, mix, verify) and reports a project error as one line and its exit code."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from micro_diffusion.data import compose as compose_module
from micro_diffusion.data import mix as mix_module
from micro_diffusion.data import verify as verify_module
from micro_diffusion.data.compose import LAYOUTS, compose
from micro_diffusion.data.mix import format_table, mix
from micro_diffusion.data.scenes import NOVEL_PAIRS, SPLITS
from micro_diffusion.data.verify import VERIFY_DAMAGED, VERIFY_OK, verify
from micro_diffusion.utils.argparsing import subparser


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the `data` group; returns its sub-parsers for the commands below."""
    p = subparser(subparsers, "data", help="dataset tools: generated scenes, shard checks, the training mix")
    sub = p.add_subparsers(dest="data_command", required=True)
    register_compose(sub)
    register_mix(sub)
    register_verify(sub)
    return sub


def _layout(text: str) -> str:
    """--layout's value; the old name `folder` fails naming `flat`."""
    if text == "folder":
        raise argparse.ArgumentTypeError("'folder' was renamed: use --layout flat")
    return text


def run_compose(args: argparse.Namespace) -> int:
    """The `data compose` command: parse its arguments into `compose`, report what was written."""
    compose(args.out, args.count, args.seed, size=args.size, split=args.split, layout=args.layout,
            images_per_prompt=args.images_per_prompt, include_novel=args.include_novel, progress=True)
    if args.layout == "geneval":
        k = 4 if args.images_per_prompt is None else args.images_per_prompt
        print(f"wrote {args.count} {args.split} prompts x {k} images in GenEval's layout to {args.out}")
    else:
        print(f"wrote {args.count} {args.split} scenes ({args.size} px) to {args.out}")
    return 0


def register_compose(sub: argparse._SubParsersAction) -> None:
    """Add `data compose` to the data command group."""
    pairs = ", ".join(f"{c} {s}" for c, s in NOVEL_PAIRS)
    p = subparser(sub, "compose", help="captioned compositional scenes with GenEval-format prompts",
                  description=compose_module.__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    p.add_argument("--count", type=int, required=True, help="scenes (flat layout) or prompts (geneval layout)")
    p.add_argument("--seed", type=int, required=True, help="train: prompts and drawings; heldout/novel: drawings")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help=f"train: all six tasks at random; heldout: the fixed evaluation list; novel: prompts naming "
                        f"the colour-shape pairs train leaves out ({pairs})")
    p.add_argument("--include-novel", action="store_true", help="train: also draw the novel colour-shape pairs")
    p.add_argument("--layout", type=_layout, choices=LAYOUTS, default="flat",
                   help="flat: <id>.png + <id>.txt per scene; geneval: GenEval's prompt folders")
    p.add_argument("--images-per-prompt", type=int, default=None, help="geneval layout: renderings a prompt "
                   "(4 when not given)")
    p.set_defaults(func=run_compose)


def run_mix(args: argparse.Namespace) -> int:
    """The `data mix` command: print the report; exit 1 if a stream is missing or empty."""
    report = mix(args.recipe, args.data_root)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 1 if report["missing"] else 0


def register_mix(sub: argparse._SubParsersAction) -> None:
    """Add `data mix` to the data command group."""
    p = subparser(sub, "mix", help="the streams a recipe reads, samples and shares per stream, against the paper's mix",
                  description=mix_module.__doc__.split("\n\n")[0])
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="recipe YAML (its data.streams)")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="stream root to use instead of the recipe's data.root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("old_data_root", nargs="?", action=_OldDataRoot, help=argparse.SUPPRESS)
    p.set_defaults(func=run_mix)


class _OldDataRoot(argparse.Action):
    """The stream root was once a second positional argument: it now fails naming --data-root."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if values is not None:
            parser.error(f"a stream root as the second argument ({values}) was renamed: use --data-root {values}")


def run_verify(args: argparse.Namespace) -> int:
    """The `data verify` command: print the damage and a line per folder; the exit code as the module doc gives it."""
    damaged = 0
    for check in verify(args.folders, hashes=not args.size_only):
        for line in check.problems:
            print(line, file=sys.stderr)
        what = "sizes" if args.size_only else "sizes and hashes"
        print(f"{check.folder}: {max(check.shards - len(check.problems), 0)} of {check.shards} shards check "
              f"({what})" + (f", {len(check.problems)} damaged" if check.problems else ""))
        damaged += len(check.problems)
    return VERIFY_DAMAGED if damaged else VERIFY_OK


def register_verify(sub: argparse._SubParsersAction) -> None:
    """Add `data verify` to the data command group."""
    p = subparser(sub, "verify", help="check every shard's size and hash against its index (exit 1 if any fails)",
                  description=verify_module.__doc__.split("\n\n")[0])
    p.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="MDS dataset folder (holds index.json)")
    p.add_argument("--size-only", action="store_true", help="check sizes only (no reading of the shards)")
    p.set_defaults(func=run_verify)
