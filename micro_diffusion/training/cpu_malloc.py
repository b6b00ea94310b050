"""CPU runs: keep freed memory inside the process, so each step reuses its buffers instead of faulting in new pages."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and never trim it; False where that is not possible.

    By default glibc maps blocks above its mmap threshold (128 KB, rising to 32 MB) straight from the kernel, unmaps
    them when freed and trims the heap's free top, so a training step that frees and re-allocates its gradients and
    activations pays one page fault per 4 KB, every step: at XL size under bf16 autocast a third of the step
    (benchmarks/bench_train.py). CUDA's caching allocator already keeps its blocks; this is the CPU counterpart.
    The cost: the process keeps its peak resident memory until it exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    # glibc converts the int -1 to the largest size_t: no trimming at all
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
