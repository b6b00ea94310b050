"""Peak memory per device of a training stage before launch: sharded training state plus probed activations.

For P parameters over n devices, on GPUs (FSDP SHARD_GRAD_OP with bf16 parameters and fp32 reduction, as the recipes
train): weights 2 P (the gathered bf16 copy, kept from forward to backward) + 4 P / n (the fp32 master shard);
gradients 2 P (bf16, whole during backward) + 4 P / n (the fp32 shard after the reduce-scatter); AdamW 8 P / n.
Without FSDP (DDP, one device): weights 4 P + the bf16 copies autocast makes each step 2 P, gradients 4 P, AdamW 8 P.
Activations: the bytes autograd saves for backward per sample, probed by two forwards on the CPU in training mode
(TREAD routes applied; one and two samples, so what does not grow with the batch cancels) and scaled by the
microbatch; on GPUs with torch's fused attention (no score matrices), on a CPU with the plain path it takes there.
With activation checkpointing (train.activation_checkpointing) the same forwards are split by transformer block: what
is saved outside the blocks, each block's input, and the internals of the largest block, which exist only while the
backward recomputes it. A CPU prediction adds the process's resident memory before the network exists (the runtime);
the CUDA allocator's peak has no such term.

What is counted is allocated bytes, the quantity CUDA's max_memory_allocated reports (an OOM comes only when those do
not fit: the caching allocator frees its cached blocks and retries first). Measured on the benchmark's Tiny
(benchmarks/bench_checkpointing.py, plain attention), each recomputed block's backward peaks per sample within the
internals counted here, and the step's live tensors stay below the prediction. A CPU process's resident peak can
exceed it with checkpointing: glibc's heap, never trimmed there (training/cpu_malloc.py), keeps the holes of each
recomputed block's freed tensors, which the next blocks' tensors, of other widths under layer-wise scaling, fill
only in part; those holes are not allocated bytes (docs/training.md, "Activation checkpointing").
"""
from __future__ import annotations

import itertools
import weakref
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


@dataclass(frozen=True)
class SavedBytes:
    """What one forward of the training loss keeps for backward, by where autograd saved it."""

    total: int  # every saved storage once: what a run without activation checkpointing keeps
    outside: int  # saved outside the transformer blocks (embeddings, patch draw, final layer, loss)
    block_inputs: int  # the blocks' inputs not already saved outside: what checkpointing keeps of the blocks
    blocks: tuple[int, ...]  # per block, in call order: what it saves beyond the two above

    @property
    def checkpointed(self) -> int:
        """What a run with the blocks recomputed keeps at its peak: outside plus the blocks' inputs, and the
        internals of the largest block while the backward recomputes it."""
        return self.outside + self.block_inputs + max(self.blocks, default=0)


class _Recorder:
    """Saved-tensor and block hooks of a probe: each saved storage to the block that saved it, or -1 outside every
    block, and the storages each block takes as input.

    Storages are told apart by identity while they live (torch keeps one Python object per storage), not by address:
    the probe runs no backward, so what autograd saves is dropped at once (packed as its byte count), the probe needs
    about the memory of a forward without gradients (not of every activation: XL at 512 px ran out of 24 GiB), and a
    freed address may come back later for another storage.
    """

    def __init__(self) -> None:
        self.ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # live storage -> serial number
        self.serials = itertools.count()
        self.saved: dict[int, tuple[int, int]] = {}  # serial -> (nbytes, block index or -1)
        self.inputs: dict[int, int] = {}  # serial -> nbytes of block inputs
        self.current, self.count = -1, 0

    def serial(self, t: torch.Tensor) -> tuple[int, int]:
        """(serial number, nbytes) of the tensor's storage, numbering it on first sight."""
        storage = t.untyped_storage()
        if storage not in self.ids:
            self.ids[storage] = next(self.serials)
        return self.ids[storage], storage.nbytes()

    def pack(self, t: torch.Tensor) -> int:
        key, nbytes = self.serial(t)
        self.saved.setdefault(key, (nbytes, self.current))  # the first saver owns it
        return nbytes

    def enter(self, _module: nn.Module, args: tuple) -> None:
        self.current, self.count = self.count, self.count + 1
        for t in args:
            if isinstance(t, torch.Tensor):
                key, nbytes = self.serial(t)
                self.inputs[key] = nbytes

    def leave(self, *_: Any) -> None:
        self.current = -1

    def result(self) -> SavedBytes:
        owner = {key: who for key, (_, who) in self.saved.items()}
        outside = sum(n for n, who in self.saved.values() if who < 0)
        kept = sum(n for key, n in self.inputs.items() if owner.get(key, 0) >= 0)  # inputs not already outside
        blocks = [0] * self.count
        for key, (n, who) in self.saved.items():
            if who >= 0 and key not in self.inputs:
                blocks[who] += n
        return SavedBytes(sum(n for n, _ in self.saved.values()), outside, kept, tuple(blocks))


def _unpack(_: int) -> torch.Tensor:
    raise RuntimeError("the memory probe keeps no saved tensor: its forward has no backward")


def saved_parts(net: nn.Module, batch: int, latent: int, caption: tuple[int, int], mask_ratio: float | None,
                fused: bool, family: str = "dit") -> SavedBytes:
    """Bytes autograd saves in one forward of the family's training loss (bf16 autocast, CPU) at `batch` samples,
    split by the family's blocks (families.Family.block_types, the units activation checkpointing recomputes).

    The global RNG is seeded first, so the one and two-sample probes draw the same masks (Fluid: the same ratio).
    The network runs in training mode whatever mode it was handed in (then restored), so TREAD routes apply as they
    do in training.
    """
    rec = _Recorder()
    blocks = [m for m in net.modules() if isinstance(m, FAMILIES[family].block_types)]
    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(rec.enter), b.register_forward_hook(rec.leave))]
    torch.manual_seed(0)
    x0 = torch.randn(batch, net.in_channels, latent, latent)
    y = torch.randn(batch, *caption)
    # sigma_data scales values, never a saved tensor's size
    d = {"mask_ratio": mask_ratio, "p_mean": 0.0, "p_std": 1.0, "sigma_data": 1.0}
    try:
        with module_mode(net, training=True), torch.autograd.graph.saved_tensors_hooks(rec.pack, _unpack), \
                torch.autocast("cpu", dtype=torch.bfloat16), fused_attention() if fused else nullcontext():
            FAMILIES[family].loss(net, x0, y, d, (None, None))
    finally:
        for h in hooks:
            h.remove()
    return rec.result()


def saved_bytes(net: nn.Module, batch: int, latent: int, caption: tuple[int, int], mask_ratio: float | None,
                fused: bool, family: str = "dit") -> int:
    """Bytes one forward of the training loss keeps for backward at `batch` samples (saved_parts' total)."""
    return saved_parts(net, batch, latent, caption, mask_ratio, fused, family).total


def activation_bytes_per_sample(net: nn.Module, latent: int, caption: tuple[int, int], mask_ratio: float | None,
                                fused: bool = True, family: str = "dit", checkpointing: bool = False) -> float:
    """Saved-for-backward bytes per sample: two samples' minus one's (the per-step weight casts cancel).

    fused=True counts torch's fused attention (what CUDA runs keep: no score matrices); False, the plain path a CPU
    run takes at few tokens. checkpointing: the blocks recomputed in the backward (train.activation_checkpointing):
    what is kept outside them and their inputs, plus the block whose internals grow most per sample.
    """
    one, two = (saved_parts(net, n, latent, caption, mask_ratio, fused, family) for n in (1, 2))
    return per_sample(one, two, checkpointing)


def per_sample(one: SavedBytes, two: SavedBytes, checkpointing: bool = False) -> float:
    """Bytes per sample from the probes of one and two samples, kept whole or with the blocks recomputed (then the
    block whose internals grow most per sample)."""
    if not checkpointing:
        return float(two.total - one.total)
    largest = max((b - a for a, b in zip(one.blocks, two.blocks, strict=True)), default=0)
    return float(two.outside + two.block_inputs - one.outside - one.block_inputs + largest)


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
    recompute = t["activation_checkpointing"]
    sample_bytes = activation_bytes_per_sample(net, latent, (m["caption_len"], m["caption_dim"]), mask, fused=True,
                                               family=m["family"], checkpointing=recompute)
    est = estimate_memory(net, devices, parallelism, int(t["device_microbatch"]), sample_bytes)
    steps = steps_of(t["max_duration"], t["global_batch"], "train.max_duration")
    flops = stage_flops(cfg, steps, t["global_batch"])[1]
    cost = cost_of(flops, devices, device_type, mfu)
    step_s = cost["device_hours"] * 3600 / devices / steps
    masks = "drawn per batch" if mask is None else mask
    lines = [f"# predicted on {devices} x {device_type} ({parallelism}, microbatch {est.microbatch}, mask {masks}, "
             f"{latent}x{latent} latents): peak {est.total / GIB:.2f} GiB per device = weights "
             f"{est.weights / GIB:.2f} + gradients {est.gradients / GIB:.2f} + optimizer {est.optimizer / GIB:.2f} + "
             f"activations {est.activations / GIB:.2f} ({sample_bytes / 2**20:.2f} MiB per sample, probed"
             f"{', blocks recomputed in the backward' if recompute else ''})",
             f"# predicted step {step_s:.3g} s, stage {steps} steps: {steps * step_s / 3600:.3g} h wall-clock "
             f"at {mfu:.0%} of the dense bf16 peak"
             + (" (model FLOPs: the blocks' recomputed forward, about a third more work, is not in it)"
                if recompute else "")]
    limit = DEVICE_MEMORY_GIB.get(device_type)
    if limit is not None and est.total > limit * GIB:
        lines.append(f"# WARNING: microbatch {est.microbatch} needs {est.total / GIB:.1f} GiB of {device_type}'s "
                     f"{limit} GiB; the largest that fits is {est.largest_microbatch(limit * GIB)} "
                     "(train.device_microbatch)")
    return lines
