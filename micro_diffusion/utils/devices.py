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
