"""Cost of training stages before running them: FLOPs from the network, then device-hours, days and dollars.

device-hours = FLOPs / (MFU x peak per device) / 3600; days = device-hours / devices / 24; dollars = device-hours x
price. MFU (model FLOP utilisation) is the share of the device's dense bf16 peak the run achieves.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..diffusion.trigflow import AdaptiveWeight
from ..errors import UsageError, check_counts
from ..families import family
from ..recipe import build_network, latent_size, load_recipe
from .flops import distill_flops_per_sample
from .prices import device_spec, usd_per_device_hour


@dataclass
class StageEstimate:
    """Compute and cost of one stage (or of the sum of stages)."""

    name: str
    steps: int
    global_batch: int | None  # None for a total over stages
    resolution: int | None  # pixels, when read from a recipe
    mask_ratio: float | None
    flops_per_sample: float | None
    flops: float
    device_hours: float
    days: float
    usd: float

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready copy."""
        return asdict(self)


def flops_per_sample(net: nn.Module, cfg: dict) -> int:
    """Training FLOPs of one sample of a recipe's stage: its family's forward+backward (MicroDiT at its mask ratio,
    Fluid at its expected one), or a distillation step."""
    size, length = latent_size(cfg), cfg["model"]["caption_len"]
    if cfg["distill"] is None:
        return family(cfg["model"]["family"]).train_flops(net, size, length, cfg["diffusion"])
    with torch.device("meta"):
        weight = AdaptiveWeight(cfg["diffusion"]["sigma_data"])  # the shape of the learned loss weighting
    return distill_flops_per_sample(net, size, length, cfg["distill"]["guidance"] != 1.0, weight)


def stage_flops(cfg: dict, steps: int, global_batch: int) -> tuple[float, float]:
    """(FLOPs per sample, total training FLOPs) of `steps` optimizer steps at `global_batch` samples each."""
    if steps < 1 or global_batch < 1:
        raise UsageError(f"steps and global_batch must be positive, got {steps} and {global_batch}")
    with torch.device("meta"):  # shapes only: XL costs no memory and no time to build
        net = build_network(cfg)
    per_sample = float(flops_per_sample(net, cfg))
    return per_sample, per_sample * steps * global_batch


def check_cost_args(devices: int, mfu: float, usd_per_hour: float | None = None) -> None:
    """Usage errors naming --devices, --mfu or --usd-per-device-hour when out of range."""
    check_counts(devices=devices)
    if not 0 < mfu <= 1:
        raise UsageError(f"--mfu {mfu:g}: the share of the peak achieved must lie in (0, 1], e.g. 0.4")
    if usd_per_hour is not None and usd_per_hour < 0:
        raise UsageError(f"--usd-per-device-hour must not be negative, got {usd_per_hour:g}")


def cost_of(flops: float, devices: int, device_type: str, mfu: float, usd_per_hour: float | None = None) -> dict:
    """Device-hours, days on `devices` devices and dollars of `flops` at utilisation `mfu`."""
    check_cost_args(devices, mfu, usd_per_hour)
    spec = device_spec(device_type)
    if spec.peak_tflops is None:
        raise ValueError(f"device type {device_type!r} has no tabled peak; estimates need a GPU type")
    device_hours = flops / (mfu * spec.peak_tflops * 1e12) / 3600
    price = usd_per_device_hour(device_type, usd_per_hour)
    return {"device_hours": device_hours, "days": device_hours / devices / 24, "usd": device_hours * price}


def steps_of(max_duration: str | int, global_batch: int, where: str) -> int:
    """Optimizer steps of a Composer duration: '250000ba' or a sample count '512000000sp'."""
    text = str(max_duration).strip()
    if text.endswith("ba") and text[:-2].isdigit():
        return int(text[:-2])
    if text.endswith("sp") and text[:-2].isdigit():
        return -(-int(text[:-2]) // global_batch)
    raise UsageError(f"{where}: cannot count steps of max_duration {max_duration!r}; give it in batches ('250000ba') "
                     "or samples ('512000000sp')")


def estimate_recipe(path: str | os.PathLike, overrides: Mapping[str, Any] | None, devices: int, device_type: str,
                    mfu: float, usd_per_hour: float | None = None) -> StageEstimate:
    """Estimate one stage from its recipe file (the recipe loader, with {dotted key: value} overrides)."""
    cfg = load_recipe(path, overrides)
    batch = int(cfg["train"]["global_batch"])
    if batch < 1:
        raise UsageError(f"{path}: train.global_batch must be at least 1, got {batch}")
    steps = steps_of(cfg["train"]["max_duration"], batch, f"{path}: train.max_duration")
    mask = cfg["diffusion"]["mask_ratio"]  # None for Fluid, which draws its own per batch
    per_sample, flops = stage_flops(cfg, steps, batch)
    cost = cost_of(flops, devices, device_type, mfu, usd_per_hour)
    return StageEstimate(cfg["stage"], steps, batch, cfg["data"]["resolution"], mask, per_sample, flops, **cost)


def total_of(stages: list[StageEstimate], devices: int) -> StageEstimate:
    """The sum of several stages run one after the other on the same `devices`."""
    hours = sum(s.device_hours for s in stages)
    return StageEstimate("total", sum(s.steps for s in stages), None, None, None, None,
                         sum(s.flops for s in stages), hours, hours / devices / 24, sum(s.usd for s in stages))


def format_table(stages: list[StageEstimate], total: StageEstimate, devices: int, device_type: str, mfu: float) -> str:
    """A plain-text table, one row per stage and a total row."""
    head = f"{'stage':<22} {'res':>5} {'mask':>5} {'steps':>8} {'batch':>6} {'GFLOP/img':>10} {'FLOPs':>9} " \
           f"{'GPU-hours':>10} {'days':>6} {'USD':>9}"
    lines = [f"{devices} x {device_type} at {mfu:.0%} utilisation", head, "-" * len(head)]
    for s in [*stages, total]:
        if s is total:
            lines.append("-" * len(head))
        res = f"{s.resolution}" if s.resolution else ""
        mask = f"{s.mask_ratio:.2f}" if s.mask_ratio is not None else ""
        gflop = f"{s.flops_per_sample / 1e9:.1f}" if s.flops_per_sample else ""
        batch = f"{s.global_batch}" if s.global_batch else ""
        lines.append(f"{s.name:<22} {res:>5} {mask:>5} {s.steps:>8} {batch:>6} {gflop:>10} "
                     f"{s.flops:>9.3g} {s.device_hours:>10,.1f} {s.days:>6.2f} {s.usd:>9,.0f}")
    return "\n".join(lines)
