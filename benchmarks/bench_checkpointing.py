"""Activation checkpointing (train.activation_checkpointing) on CPU: step time and peak resident memory with and
without each block recomputed, and the dry run's memory model against the measured peak.

MicroDiT_Tiny_2 at batch 8, 32x32 latents, 77x1024 caption tokens, mask ratios 0.75 (stage 1) and 0 (the finetunes),
in the device's compute dtype as bench_train runs it; each configuration in a fresh process, so its peak resident
set is its own. The prediction is the memory model's (cost/memory.py) for one CPU process without optimizer state:
the process's memory before the network, fp32 weights and gradients, autocast's bf16 copies and the probed
activations, with the blocks recomputed when they are; it should lie within 15% of the measured peak. One more
(untimed) step counts the live tensor bytes (common.LiveTensorPeak): the peak of what is allocated, as CUDA's
max_memory_allocated reports it, without the holes glibc's never-trimmed heap keeps (cpu_malloc), which the resident
peak includes.
    python -m benchmarks.bench_checkpointing             # a few minutes on 2 idle CPU cores
    python -m benchmarks.bench_checkpointing --quick     # tiny sizes, seconds: checks the harness runs
"""
from __future__ import annotations

import multiprocessing as mp

import torch

from benchmarks.bench_train import step_fn
from benchmarks.common import (
    QUICK,
    LiveTensorPeak,
    add_out_argument,
    bench_device,
    device_name,
    peak_memory_mb,
    time_fn,
    write_result,
)
from micro_diffusion.cost.memory import activation_bytes_per_sample, estimate_memory, resident_bytes
from micro_diffusion.families import FAMILIES
from micro_diffusion.models import create_dit
from micro_diffusion.training.checkpointing import checkpoint_blocks, recompute
from micro_diffusion.utils.argparsing import parser as make_parser
from micro_diffusion.utils.devices import compute_dtype, dtype_name

TOLERANCE = 0.15  # the prediction's allowed distance from the measured peak, as a share of the peak


def warm_checkpoint() -> None:
    """One tiny recomputed call: torch's first checkpoint imports about 100 MB of modules (torch._dynamo and what it
    pulls in), code the process holds before the network like any other (the prediction's runtime term)."""
    x = torch.ones(1, requires_grad=True)
    recompute(torch.sin, x).backward()


def measure(args: tuple) -> dict:
    """One configuration in this (fresh) process: the timed steps and the peak resident memory, then the prediction,
    probed after the steps (its small forwards stay below their peak; before them, the heap would keep their blocks)
    on a network built again with the same seed (the measured one recomputes its blocks, past the probe's hooks)."""
    preset, batch, latent, caption, mask, recomputed, repeats, overrides, device_name_ = args
    device = bench_device(device_name_)
    dtype = compute_dtype(device)
    warm_checkpoint()  # in both configurations, so their peaks differ by the activations alone
    runtime = resident_bytes()

    def network() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_dit(preset, latent_size=latent, caption_dim=caption[1], **overrides)

    net = network()
    if recomputed:
        checkpoint_blocks(net, FAMILIES["dit"].block_types)
    step = step_fn(net.to(device), batch, latent, caption, mask, device, dtype)
    seconds = time_fn(step, device, repeats=repeats)
    peak = peak_memory_mb(device)
    with LiveTensorPeak() as tensors:  # after the resident peak is read: its slower step changes no reading
        step()
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    live = (runtime + weights + tensors.peak) / 2**20  # what existed before the step, plus the step's peak
    del net, step
    probed = network()
    per_sample = activation_bytes_per_sample(probed, latent, caption, mask, fused=False, checkpointing=recomputed)
    est = estimate_memory(probed, 1, "none", batch, per_sample, runtime)
    predicted = (est.total - est.optimizer) / 2**20
    print(f"{preset} mask {mask:.2f} {'recomputed' if recomputed else 'kept     '}: {seconds:6.2f} s/step, peak "
          f"{peak:6.0f} MB, predicted {predicted:6.0f} MB ({predicted / peak - 1:+.0%}); live tensors at most "
          f"{live:6.0f} MB", flush=True)
    return dict(preset=preset, mask_ratio=mask, checkpointing=recomputed, batch=batch, seconds=seconds,
                peak_memory_mb=peak, predicted_memory_mb=predicted, live_peak_mb=live, runtime_mb=runtime / 2**20,
                activations_mb=est.activations / 2**20)


def compare(rows: list[dict]) -> list[dict]:
    """Per mask ratio: the step-time cost and the memory saved by recomputing, and the prediction's error."""
    out = []
    for mask in dict.fromkeys(r["mask_ratio"] for r in rows):
        kept, recomputed = (next(r for r in rows if r["mask_ratio"] == mask and r["checkpointing"] is c)
                            for c in (False, True))
        error = recomputed["predicted_memory_mb"] / recomputed["peak_memory_mb"] - 1
        out.append(dict(mask_ratio=mask, time_ratio=recomputed["seconds"] / kept["seconds"],
                        peak_saved_mb=kept["peak_memory_mb"] - recomputed["peak_memory_mb"],
                        activations_saved_mb=kept["activations_mb"] - recomputed["activations_mb"],
                        prediction_error=error, prediction_within_tolerance=abs(error) <= TOLERANCE))
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run every configuration in its own process and write OUT/checkpointing.json."""
    parser = make_parser("python -m benchmarks.bench_checkpointing", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the speed")
    parser.add_argument("--preset", default="MicroDiT_Tiny_2", help="the network measured")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per timed step")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (the median is kept)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    latent, caption, overrides = (8, (7, 32), QUICK) if args.quick else (32, (77, 1024), {})
    repeats = 1 if args.quick else args.repeats
    jobs = [(args.preset, args.batch_size, latent, caption, mask, recomputed, repeats, overrides, "cpu")
            for mask in (0.75, 0.0) for recomputed in (False, True)]
    ctx = mp.get_context("spawn")  # a fresh process per configuration: ru_maxrss is the process's own peak
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        rows = pool.map(measure, jobs, chunksize=1)
    result = dict(device=device_name(torch.device("cpu")), dtype=dtype_name(compute_dtype(torch.device("cpu"))),
                  quick=args.quick, latent=latent, caption=list(caption), tolerance=TOLERANCE, runs=rows,
                  comparison=compare(rows))
    for c in result["comparison"]:
        print(f"mask {c['mask_ratio']:.2f}: recomputing costs {c['time_ratio']:.2f}x the step time and saves "
              f"{c['peak_saved_mb']:.0f} MB of peak memory; prediction {c['prediction_error']:+.0%} of the peak "
              f"({'within' if c['prediction_within_tolerance'] else 'OUTSIDE'} {TOLERANCE:.0%})", flush=True)
    write_result(args.out, "checkpointing_quick" if args.quick else "checkpointing", result)
    return result


if __name__ == "__main__":
    main()
