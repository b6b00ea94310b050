"""Peak memory per device of a training stage before launch: sharded training state plus probed activations.

For P parameters over n devices, on GPUs (FSDP SHARD_GRAD_OP with bf16 parameters and fp32 reduction, as the recipes
train): weights 2 P (the gathered bf16 copy, kept from forward to backward) + 4 P / n (the fp32 master shard);
gradients 2 P (bf16, whole during backward) + 4 P / n (the fp32 shard after the reduce-scatter); AdamW 8 P / n.
Without FSDP (DDP, one device): weights 4 P + the bf16 copies autocast makes each step 2 P, gradients 4 P, AdamW 8 P.
Activations: the bytes autograd saves for backward per sample, probed by two forwards on the CPU in training mode
(TREAD routes applied; one and two samples, so what does not grow with the batch cancels) and scaled by the
microbatch; on GPUs with torch's fused attention (no score matrices), on a CPU with the plain path it takes there. A
CPU prediction adds the process's resident memory before the network exists (the runtime); the CUDA allocator's peak
has no such term.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..families import FAMILIES
from ..models.attention import fused_attention
from ..recipe import build_network, latent_size
from ..utils.modes import module_mode
from .estimate import cost_of, stage_flops, steps_of
from .prices import DEVICE_MEMORY_GIB

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per device of one stage, by part."""

    params: int
    devices: int
    parallelism: str  # "fsdp", "ddp" or "none"
    weights: float
    gradients: float
    optimizer: float
    activations_per_sample: float
    microbatch: int
    runtime: float = 0.0  # resident bytes of the process before the network (CPU predictions)

    @property
    def activations(self) -> float:
        """Activation bytes of one microbatch."""
        return self.activations_per_sample * self.microbatch

    @property
    def total(self) -> float:
        """Predicted peak bytes per device."""
        return self.runtime + self.weights + self.gradients + self.optimizer + self.activations

    def largest_microbatch(self, limit_bytes: float) -> int:
        """The largest microbatch whose predicted peak stays within limit_bytes (0: not even one sample)."""
        room = limit_bytes - (self.runtime + self.weights + self.gradients + self.optimizer)
        return max(0, int(room // self.activations_per_sample)) if self.activations_per_sample > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready copy with the totals."""
        return {**asdict(self), "activations": self.activations, "total": self.total}


def state_bytes(params: int, devices: int, parallelism: str) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per device of `params` parameters trained with AdamW in bf16."""
    if devices < 1:
        raise ValueError(f"devices must be positive, got {devices}")
    if parallelism == "fsdp":
        return 2 * params + 4 * params / devices, 2 * params + 4 * params / devices, 8 * params / devices
    if parallelism in ("ddp", "none"):
        return 4 * params + 2 * params, 4 * params, 8 * params
    raise ValueError(f"unknown parallelism {parallelism!r}; known: fsdp, ddp, none")


def saved_bytes(net: nn.Module, batch: int, latent: int, caption: tuple[int, int], mask_ratio: float | None,
                fused: bool, family: str = "dit") -> int:
    """Bytes autograd saves in one forward of the family's training loss (bf16 autocast, CPU) at `batch` samples.

    The global RNG is seeded first, so the one and two-sample probes draw the same masks (Fluid: the same ratio).
    The network runs in training mode whatever mode it was handed in (then restored), so TREAD routes apply as they
    do in training.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    x0 = torch.randn(batch, net.in_channels, latent, latent)
    y = torch.randn(batch, *caption)
    # sigma_data scales values, never a saved tensor's size
    d = {"mask_ratio": mask_ratio, "p_mean": 0.0, "p_std": 1.0, "sigma_data": 1.0}
    loss = FAMILIES[family].loss
    with module_mode(net, training=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16), fused_attention() if fused else nullcontext():
        loss(net, x0, y, d, (None, None))
    return sum(storages.values())


def activation_bytes_per_sample(net: nn.Module, latent: int, caption: tuple[int, int], mask_ratio: float | None,
                                fused: bool = True, family: str = "dit") -> float:
    """Saved-for-backward bytes per sample: two samples' minus one's (the per-step weight casts cancel).

    fused=True counts torch's fused attention (what CUDA runs keep: no score matrices); False, the plain path a CPU
    run takes at few tokens.
    """
    one, two = (saved_bytes(net, n, latent, caption, mask_ratio, fused, family) for n in (1, 2))
    return float(two - one)


def estimate_memory(net: nn.Module, devices: int, parallelism: str, microbatch: int,
                    activations_per_sample: float, runtime: float = 0.0) -> MemoryEstimate:
    """The stage's predicted memory per device from its network, device count, sharding and microbatch."""
    params = sum(p.numel() for p in net.parameters())
    weights, grads, optim = state_bytes(params, devices, parallelism)
    return MemoryEstimate(params, devices, parallelism, weights, grads, optim, activations_per_sample, microbatch,
                          runtime)


def resident_bytes() -> float:
    """This process's resident memory now (Linux /proc; 0 where it is not readable)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return float(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) * 1024)


def predict_stage(cfg: dict, devices: int, device_type: str, mfu: float, parallelism: str) -> list[str]:
    """The dry run's prediction of a recipe's stage on GPUs of a tabled type: memory per device by part (no CUDA
    context or allocator slack), step time and stage wall-clock at utilisation `mfu` (the cost estimator's).

    A microbatch whose predicted peak exceeds the device's memory is a warning line naming the largest that fits.
    """
    t, m = cfg["train"], cfg["model"]
    torch.manual_seed(0)
    net = build_network(cfg)
    latent, mask = latent_size(cfg), cfg["diffusion"]["mask_ratio"]
    per_sample = activation_bytes_per_sample(net, latent, (m["caption_len"], m["caption_dim"]), mask, fused=True,
                                             family=m["family"])
    est = estimate_memory(net, devices, parallelism, int(t["device_microbatch"]), per_sample)
    steps = steps_of(t["max_duration"], t["global_batch"], "train.max_duration")
    flops = stage_flops(cfg, steps, t["global_batch"])[1]
    cost = cost_of(flops, devices, device_type, mfu)
    step_s = cost["device_hours"] * 3600 / devices / steps
    masks = "drawn per batch" if mask is None else mask
    lines = [f"# predicted on {devices} x {device_type} ({parallelism}, microbatch {est.microbatch}, mask {masks}, "
             f"{latent}x{latent} latents): peak {est.total / GIB:.2f} GiB per device = weights "
             f"{est.weights / GIB:.2f} + gradients {est.gradients / GIB:.2f} + optimizer {est.optimizer / GIB:.2f} + "
             f"activations {est.activations / GIB:.2f} ({per_sample / 2**20:.2f} MiB per sample, probed)",
             f"# predicted step {step_s:.3g} s, stage {steps} steps: {steps * step_s / 3600:.3g} h wall-clock "
             f"at {mfu:.0%} of the dense bf16 peak"]
    limit = DEVICE_MEMORY_GIB.get(device_type)
    if limit is not None and est.total > limit * GIB:
        lines.append(f"# WARNING: microbatch {est.microbatch} needs {est.total / GIB:.1f} GiB of {device_type}'s "
                     f"{limit} GiB; the largest that fits is {est.largest_microbatch(limit * GIB)} "
                     "(train.device_microbatch)")
    return lines
