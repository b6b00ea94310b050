"""Device selection: one answer to "which device, and what does Composer call it" for every caller."""
from __future__ import annotations

import os

import torch


def torch_device(requested: str | None = None, local_rank: int | None = None) -> torch.device:
    """The torch device for a request: None or "auto" picks CUDA when visible, else the CPU.

    "gpu" (Composer's name) and "cuda" mean the same; a bare GPU request takes this process's local rank (LOCAL_RANK,
    as torchrun and `composer -n` set it). Asking for CUDA where none is visible is an error naming the request.
    """
    name = (requested or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu":
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} asked for, but no CUDA device is visible")
        if name == "cuda":
            name = f"cuda:{local_rank if local_rank is not None else int(os.environ.get('LOCAL_RANK', 0))}"
    elif name != "cpu":
        raise ValueError(f"unknown device {requested!r} (use auto, cpu, gpu or cuda[:N])")
    return torch.device(name)


def composer_device(device: torch.device) -> str:
    """Composer's name of a torch device: "gpu" or "cpu"."""
    return "gpu" if device.type == "cuda" else "cpu"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's DataLoader counts them), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def loader_workers(requested: int) -> int:
    """DataLoader worker processes for this rank: `requested`, at most this rank's share of the usable CPUs
    (LOCAL_WORLD_SIZE ranks share a node), at least 1 unless 0 (load in the main process) was asked for."""
    if requested <= 0:
        return 0
    share = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(requested, share))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, tens of times slower
    than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype the device computes fastest: bf16 on CUDA, bf16 on a CPU with native bf16, else fp32."""
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """The short name results report a dtype by: "bf16", "fp16" or "fp32"."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise ValueError(f"no compute dtype {dtype}; use bf16, fp16 or fp32")
    return names[dtype]


def autocast(device: torch.device | str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on the device; plain fp32 (autocast off) when dtype is fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype if dtype != torch.float32 else torch.bfloat16,
                          enabled=dtype != torch.float32)
