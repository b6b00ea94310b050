"""Device prices and peak throughputs: the defaults the cost ledger and the estimates use.

Prices are on-demand list prices per device-hour in US dollars (assumptions, not quotes): H100 at $3.75 as the paper
assumes ($30 per 8-GPU node-hour). CPU runs are priced per core-hour. Peaks are dense bf16 tensor throughput
without sparsity. Override a price with the recipe (`usd_per_device_hour`) or the environment variable
MICRO_DIFFUSION_USD_PER_DEVICE_HOUR; an explicit argument wins over the variable, the variable over this table.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

PRICE_ENV = "MICRO_DIFFUSION_USD_PER_DEVICE_HOUR"


@dataclass(frozen=True)
class DeviceSpec:
    """What one device of a kind costs per hour and can do at its peak."""

    name: str
    usd_per_hour: float
    peak_tflops: float | None  # dense bf16; None: measured at run time (CPUs)
    unit: str = "GPU"  # what one "device" is: a GPU, or a CPU core


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("NVIDIA H100 SXM", 3.75, 989.0),
    "h200": DeviceSpec("NVIDIA H200 SXM", 4.50, 989.0),
    "a100": DeviceSpec("NVIDIA A100 SXM", 2.00, 312.0),
    "l40s": DeviceSpec("NVIDIA L40S", 1.20, 362.0),
    "a10g": DeviceSpec("NVIDIA A10G", 1.00, 70.0),
    "cpu": DeviceSpec("CPU core", 0.05, None, unit="core"),  # about one vCPU-hour of a compute-optimised cloud VM
}

# Memory per device in GiB, for the dry run's fit check (an 80 GB H100 gives torch 79.6 GiB).
DEVICE_MEMORY_GIB: dict[str, float] = {"h100": 79.6, "h200": 139.8, "a100": 79.2, "l40s": 44.4, "a10g": 22.0}

# Substrings of torch.cuda.get_device_name() that identify a table entry (checked in order).
_CUDA_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("L40S", "l40s"), ("A10G", "a10g"))


def device_spec(device_type: str) -> DeviceSpec:
    """The table entry of a device type such as 'h100' or 'cpu'."""
    key = device_type.lower()
    if key not in DEVICES:
        raise KeyError(f"unknown device type {device_type!r}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def detect_device_type(use_cuda: bool) -> str:
    """The table key of the device this process trains on; an unknown GPU is an error naming it."""
    if not use_cuda:
        return "cpu"
    name = torch.cuda.get_device_name()
    for part, key in _CUDA_NAMES:
        if part in name:
            return key
    raise KeyError(f"GPU {name!r} is not in the price table; pass device_type and usd_per_device_hour explicitly")


def usd_per_device_hour(device_type: str, override: float | None = None) -> float:
    """Price of one device-hour: the explicit override, else the environment variable, else the table."""
    if override is not None:
        price = float(override)
    elif os.environ.get(PRICE_ENV):
        raw = os.environ[PRICE_ENV]
        try:
            price = float(raw)
        except ValueError as err:
            raise ValueError(f"{PRICE_ENV}={raw!r} is not a number of dollars") from err
    else:
        price = device_spec(device_type).usd_per_hour
    if price < 0:
        raise ValueError(f"price per device-hour must not be negative, got {price}")
    return price


def matmul_peak_tflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, size: int = 1024,
                       seconds: float = 0.25) -> float:
    """Achieved TFLOP/s of size^3 matrix products in dtype on device, over about `seconds` after one warm-up product.

    The practical peak utilisation is measured against on CPUs (the ledger, the benchmarks' share of peak).
    """
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)  # warm-up: first calls pick kernels and allocate
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return runs * 2 * size**3 / elapsed / 1e12
