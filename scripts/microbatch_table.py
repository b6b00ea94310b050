"""The README's table: the largest per-device microbatch of each of the paper's four stages on cards of 24, 40, 48
and 80 GB, with and without activation checkpointing, as the dry run's memory model (cost/memory.py) predicts it.

    .venv/bin/python scripts/microbatch_table.py [--devices 8] [--cards 24 40 48 80]     (two XL forwards per stage)

A card of C GB holds C x 10^9 bytes here (80 GB: 74.5 GiB), leaving the rest to the CUDA context and allocator slack
that the model does not count; weights, gradients and AdamW state are FSDP SHARD_GRAD_OP's share over --devices
GPUs, activations the CPU probe's bytes per sample (torch's fused attention, as CUDA runs keep).
"""
from __future__ import annotations

import torch

from micro_diffusion.cost.memory import estimate_memory, per_sample, saved_parts
from micro_diffusion.recipe import build_network, latent_size, load_recipe
from micro_diffusion.training.run import parallelism
from micro_diffusion.utils.argparsing import parser as make_parser

STAGES = ("res256_masked", "res256_finetune", "res512_masked", "res512_finetune")


def largest(stage: str, devices: int, cards: list[float]) -> tuple[dict, list[tuple[int, int]]]:
    """The stage's recipe settings and, per card, the largest microbatch without and with checkpointing."""
    cfg = load_recipe(f"recipes/{stage}.yaml")
    m, mask, latent = cfg["model"], cfg["diffusion"]["mask_ratio"], latent_size(cfg)
    torch.manual_seed(0)
    net = build_network(cfg)
    caption = (m["caption_len"], m["caption_dim"])
    one, two = (saved_parts(net, n, latent, caption, mask, fused=True, family=m["family"]) for n in (1, 2))
    split = parallelism(cfg["train"]["parallelism"], "gpu", devices)
    sizes = [per_sample(one, two, c) / 2**20 for c in (False, True)]
    print(f"# {stage}: {sizes[0]:.1f} MiB per sample kept, {sizes[1]:.1f} MiB with the blocks recomputed", flush=True)
    fits = []
    for gb in cards:
        fits.append(tuple(estimate_memory(net, devices, split, 1, per_sample(one, two, c)).largest_microbatch(gb * 1e9)
                          for c in (False, True)))
    info = {"resolution": cfg["data"]["resolution"], "mask": mask, "microbatch": cfg["train"]["device_microbatch"]}
    return info, fits


def main(argv: list[str] | None = None) -> str:
    """Print the markdown table."""
    parser = make_parser("scripts/microbatch_table.py", __doc__)
    parser.add_argument("--devices", type=int, default=8, help="GPUs the stage is sharded over (FSDP)")
    parser.add_argument("--cards", type=float, nargs="+", default=[24, 40, 48, 80], help="card memory in GB")
    args = parser.parse_args(argv)
    lines = ["| stage | res | mask | recipe's microbatch | " + " | ".join(f"{c:g} GB" for c in args.cards) + " |",
             "| --- " * (4 + len(args.cards)) + "|"]
    for stage in STAGES:
        info, fits = largest(stage, args.devices, args.cards)
        cells = " | ".join(f"{kept} / {recomputed}" for kept, recomputed in fits)
        lines.append(f"| {stage} | {info['resolution']} | {info['mask']} | {info['microbatch']} | {cells} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\n{table}")
    return table


if __name__ == "__main__":
    main()
