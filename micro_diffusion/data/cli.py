"""`micro-diffusion data ...`: the data layer's command group (each command registers itself from its module)."""
from __future__ import annotations

import argparse

from micro_diffusion.data.compose import register_compose
from micro_diffusion.data.mix import register_mix
from micro_diffusion.data.verify import register_verify


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the `data` group; returns its sub-parsers for the commands below."""
    p = subparsers.add_parser("data", help="dataset tools: generated scenes, shard checks, the training mix")
    sub = p.add_subparsers(dest="data_command", required=True)
    register_compose(sub)
    register_mix(sub)
    register_verify(sub)
    return sub
