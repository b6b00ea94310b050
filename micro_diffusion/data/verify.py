"""`micro-diffusion data verify DIR [DIR ...]`: every shard's size and hash against its MDS index.

Exit codes: 0 when every shard checks, 1 when any is damaged (one line each, naming the file, what was expected and
found, and how to repair it), 2 on bad usage (a folder without an index.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from micro_diffusion.data.integrity import check_folder
from micro_diffusion.data.schema import index_shards

VERIFY_OK, VERIFY_DAMAGED, VERIFY_USAGE = 0, 1, 2


def run_verify(args: argparse.Namespace) -> int:
    """Check each folder's shards (size, then hash); print the damage; the exit code as the module doc gives it."""
    for folder in args.folders:
        if not (folder / "index.json").is_file():
            print(f"data verify: error: no MDS index at {folder / 'index.json'}", file=sys.stderr)
            return VERIFY_USAGE
    damaged = 0
    for folder in args.folders:
        problems = check_folder(folder, hashes=not args.size_only)
        try:
            shards = len(index_shards(folder)[1])
        except ValueError:
            shards = 0
        for line in problems:
            print(line, file=sys.stderr)
        what = "sizes" if args.size_only else "sizes and hashes"
        print(f"{folder}: {max(shards - len(problems), 0)} of {shards} shards check ({what})"
              + (f", {len(problems)} damaged" if problems else ""))
        damaged += len(problems)
    return VERIFY_DAMAGED if damaged else VERIFY_OK


def register_verify(sub: argparse._SubParsersAction) -> None:
    """Add `data verify` to the data command group."""
    p = sub.add_parser("verify", help="check every shard's size and hash against its index (exit 1 if any fails)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="MDS dataset folder (holds index.json)")
    p.add_argument("--size-only", action="store_true", help="check sizes only (no reading of the shards)")
    p.set_defaults(func=run_verify)
