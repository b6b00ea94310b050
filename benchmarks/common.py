"""Shared pieces of the benchmarks: timing, device names, peak memory and result files."""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from micro_diffusion.training.cpu_malloc import keep_freed_memory

RESULTS = Path(__file__).parent / "results"
QUICK = dict(width=64, depth=2, head_dim=16, patch_mixer_depth=1, patch_mixer_width=64)  # --quick network overrides


def bench_device(name: str) -> torch.device:
    """The device to measure on; on CPU, glibc keeps freed memory as `micro-diffusion train` has it (cpu_malloc)."""
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


def device_name(device: torch.device) -> str:
    """A readable name of the device the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times are the work's times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of one call of fn after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


class LiveTensorPeak(TorchDispatchMode):
    """Bytes of the tensor storages the ops create while active that are still alive, and their peak: on CPU the
    counterpart of CUDA's max_memory_allocated (what the memory model counts), free of the holes a heap keeps.

    Storages that exist before (parameters, inputs) are not counted; each one counts once, whatever views share it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                storage = t.untyped_storage()  # one Python object per storage while it lives: its finalizer is the free
                self._seen.add(storage)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """The `--out DIR` every benchmark takes: the folder its JSON result goes to."""
    parser.add_argument("--out", type=Path, default=RESULTS, help="result folder")


def write_result(out_dir: Path, name: str, payload: dict) -> Path:
    """Write one benchmark's results to OUT_DIR/NAME.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
