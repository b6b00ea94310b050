"""Device prices and peak throughputs: the defaults the cost ledger and the estimates use.

Prices are on-demand list prices per device-hour in US dollars (assumptions, not quotes): H100 at $3.75 as the paper
assumes ($30 per 8-GPU node-hour). CPU runs are priced per core-hour. Peaks are dense throughput without sparsity,
per precision: bf16 tensor cores, and fp32 without TF32 (torch's default for matrix products). Utilisation divides by
the peak of the precision the run computed in; a CPU's peak is measured in that precision (`run_peak_tflops`).
Override a price with the recipe (`usd_per_device_hour`) or the environment variable
MICRO_DIFFUSION_USD_PER_DEVICE_HOUR; an explicit argument wins over the variable, the variable over this table.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ..utils.devices import dtype_name

PRICE_ENV = "MICRO_DIFFUSION_USD_PER_DEVICE_HOUR"


@dataclass(frozen=True)
class DeviceSpec:
    """What one device of a kind costs per hour and can do at its peak."""

    name: str
    usd_per_hour: float
    peak_tflops: float | None  # dense bf16 (fp16 the same); None: measured at run time (CPUs)
    peak_tflops_fp32: float | None = None  # dense fp32 (no TF32); None: measured at run time
    unit: str = "GPU"  # what one "device" is: a GPU, or a CPU core

    def peak(self, dtype: torch.dtype) -> float | None:
        """The tabled dense peak in the precision `dtype` computes in; None where it is measured instead."""
        return self.peak_tflops_fp32 if dtype == torch.float32 else self.peak_tflops


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("NVIDIA H100 SXM", 3.75, 989.0, 67.0),
    "h200": DeviceSpec("NVIDIA H200 SXM", 4.50, 989.0, 67.0),
    "a100": DeviceSpec("NVIDIA A100 SXM", 2.00, 312.0, 19.5),
    "l40s": DeviceSpec("NVIDIA L40S", 1.20, 362.0, 91.6),
    "a10g": DeviceSpec("NVIDIA A10G", 1.00, 70.0, 31.2),
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


def matmul_peak_tflops(device: torch.device | str, dtype: torch.dtype, size: int = 1024,
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


def run_peak_tflops(device: torch.device | str, dtype: torch.dtype, device_type: str | None = None,
                    size: int = 1024, seconds: float = 0.25) -> tuple[float, str]:
    """Dense peak TFLOP/s of one device in the precision a run computes in, and where it came from: the table for a
    known GPU, else (CPUs, GPUs or precisions the table lacks) a size^3 matmul timing in that dtype on the device."""
    device = torch.device(device)
    try:
        tabled = device_spec(device_type or detect_device_type(device.type == "cuda")).peak(dtype)
    except KeyError:  # a GPU the table lacks: measured below, and the source says so
        tabled = None
    if tabled is not None:
        return tabled, f"price table (dense {dtype_name(dtype)})"
    return matmul_peak_tflops(device, dtype, size, seconds), f"measured {dtype_name(dtype)} matmul"
