"""keep_freed_memory: a step that re-allocates the buffers it freed stops faulting in fresh pages."""
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from micro_diffusion.training.cpu_malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(10):  # like a training step: buffers of mixed sizes, all held, then all freed
    start = faults()
    held = [torch.empty(mb * 2**18).fill_(1.0) for mb in (64, 16, 48, 64, 8)]
    del held
    per_step.append(faults() - start)
print(sum(per_step[5:]))  # steady state: the heap settles within a few steps
"""
PAGES = 5 * 200 * 2**20 // 4096  # the last five steps of 200 MB, in 4 KB pages


def page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.slow
def test_freed_buffers_are_reused_instead_of_refaulted():
    assert page_faults("default") > PAGES // 2  # glibc returns these blocks to the kernel: the control
    assert page_faults("keep") < PAGES // 20
