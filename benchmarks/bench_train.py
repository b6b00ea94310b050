"""Training-step benchmark: forward+backward time, images/s, achieved GFLOP/s and share of the matmul peak.

Runs Tiny and XL (batch 8, 32x32 latents, 77x1024 caption tokens) at mask ratios 0, 0.5 and 0.75 in the device's
compute dtype (utils.devices.compute_dtype: bf16 autocast on CUDA and on CPUs with native bf16, else fp32; the
result's `dtype` says which ran, and the peaks are measured or tabled in that dtype),
deferred against naive masking, and the MoE layer against a dense FFN of the same active FLOPs.
    python benchmarks/bench_train.py                 # the full suite (about 6 minutes on 2 CPU cores)
    python benchmarks/bench_train.py --quick         # tiny sizes, seconds: checks the harness runs
    python -m benchmarks.bench_train --presets MicroDiT_Tiny_2 --reference ~/src/micro_diffusion
        # also times the public reference's network (a local checkout; `pip install -e '.[reference]'` for einops)
        # beside ours at mask 0.75, in this process, alternating rounds on the same inputs: best of --repeats each
Without --reference only our network is measured, and no ratio against the reference is reported.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import QUICK, add_out_argument, bench_device, device_name, peak_memory_mb, time_fn, write_result
from micro_diffusion.cost.flops import train_flops_per_sample
from micro_diffusion.cost.memory import activation_bytes_per_sample, estimate_memory, resident_bytes
from micro_diffusion.cost.prices import detect_device_type, device_spec, matmul_peak_tflops
from micro_diffusion.diffusion.edm import SIGMA_DATA, EDMPrecond
from micro_diffusion.models import create_dit
from micro_diffusion.models.ffn import ExpertChoiceMoE
from micro_diffusion.utils.argparsing import parser as make_parser
from micro_diffusion.utils.argparsing import renamed
from micro_diffusion.utils.devices import autocast, compute_dtype, dtype_name
from micro_diffusion.utils.seeds import seeded_generator

SIDE_BY_SIDE_MASK = 0.75  # the mask ratio of the side-by-side rounds: stage 1's


def step_fn(net: nn.Module, batch: int, latent: int, caption: tuple[int, int], mask: float, device: torch.device,
            dtype: torch.dtype, seeded_patches: bool = True):
    """One forward+backward of the EDM loss in `dtype` (autocast unless fp32), as training runs it (patches from the
    global RNG when not seeded_patches: the reference network draws them so)."""
    x0 = torch.randn(batch, 4, latent, latent, device=device)
    y = torch.randn(batch, *caption, device=device)
    noise_gen = seeded_generator(0, device)
    patch_gen = seeded_generator(1, device) if seeded_patches else None
    denoiser = EDMPrecond(net, SIGMA_DATA)  # the released models' value: it changes no step's cost

    def step() -> None:
        with autocast(device, dtype):
            loss = denoiser.loss(x0, y, -0.6, 1.2, noise_gen, mask_ratio=mask, generator=patch_gen)  # stage 1's noise
        loss.backward()
        net.zero_grad(set_to_none=True)

    return step


def bench_preset(args: tuple) -> list[dict]:
    """All mask ratios of one preset in one process, least memory first, so peak RSS readings stay per config."""
    name, batch, latent, caption, repeats, overrides, device, peak, spec_peak = args
    device = bench_device(device)
    dtype = compute_dtype(device)  # a spawned process: the allocator setting is set here again
    runtime = resident_bytes() if device.type == "cpu" else 0.0  # the CUDA allocator's peak has no such term
    torch.manual_seed(0)
    net = create_dit(name, latent_size=latent, caption_dim=caption[1], **overrides).to(device)
    rows = []
    for label, mask, extra in (("deferred", 0.75, {}), ("deferred", 0.5, {}), ("deferred", 0.0, {}),
                               ("naive", 0.75, {"patch_mixer_depth": 0})):
        model = net if not extra else create_dit(name, latent_size=latent, caption_dim=caption[1],
                                                 **{**overrides, **extra}).to(device)
        seconds = time_fn(step_fn(model, batch, latent, caption, mask, device, dtype), device, repeats=repeats)
        flops = train_flops_per_sample(model, latent_size=latent, caption_len=caption[0], mask_ratio=mask)
        gflops = flops * batch / seconds / 1e9
        rows.append(dict(preset=name, masking=label, mask_ratio=mask, batch=batch, seconds=seconds,
                         images_per_s=batch / seconds, gflop_per_image=flops / 1e9, gflop_per_s=gflops,
                         share_of_peak=gflops / peak, mfu=gflops / spec_peak if spec_peak else None,
                         peak_memory_mb=peak_memory_mb(device)))
        print(f"{name:16s} {label:8s} mask {mask:4.2f}: {seconds:7.2f} s  {gflops:8.1f} GFLOP/s  "
              f"{100 * gflops / peak:5.1f}% of peak" + (f", MFU {gflops / spec_peak:.1%}" if spec_peak else ""),
              flush=True)
    rows[0]["predicted_memory_mb"] = predicted_memory_mb(net, batch, latent, caption, rows[0]["mask_ratio"], device,
                                                         runtime)
    print(f"{name:16s} deferred mask 0.75: peak memory {rows[0]['peak_memory_mb']:.0f} MB, the dry run's memory model "
          f"predicts {rows[0]['predicted_memory_mb']:.0f} MB", flush=True)
    return rows


def predicted_memory_mb(net: nn.Module, batch: int, latent: int, caption: tuple[int, int], mask: float,
                        device: torch.device, runtime: float) -> float:
    """The dry run's memory model (cost/memory.py) for this one-device forward+backward, without optimizer state;
    probed after the measured steps (the probe's two small forwards stay below their peak)."""
    per_sample = activation_bytes_per_sample(net.cpu(), latent, caption, mask, fused=device.type != "cpu")
    net.to(device)
    est = estimate_memory(net, 1, "none", batch, per_sample, runtime)
    return (est.total - est.optimizer) / 2**20


def bench_moe(dim: int, hidden: int, tokens: int, batch: int, device: torch.device, repeats: int,
              dtype: torch.dtype) -> dict:
    """MoE layer against a dense GELU FFN whose hidden size gives the same FLOPs per token (capacity x hidden), in
    `dtype` (autocast unless fp32)."""
    moe = ExpertChoiceMoE(dim, hidden, num_experts=8, capacity_factor=2.0).to(device)
    nn.init.normal_(moe.w_in, std=0.02)
    nn.init.normal_(moe.w_out, std=0.02)
    dense_hidden = int(moe.capacity(tokens) * moe.num_experts * hidden / tokens)
    dense = nn.Sequential(nn.Linear(dim, dense_hidden, bias=False), nn.GELU(approximate="tanh"),
                          nn.Linear(dense_hidden, dim, bias=False)).to(device)
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)

    def run(layer: nn.Module):
        def step() -> None:
            with autocast(device, dtype):
                out = layer(x)
            out.float().sum().backward()
        return step

    t_moe, t_dense = (time_fn(run(layer), device, warmup=2, repeats=repeats) for layer in (moe, dense))
    return dict(dim=dim, hidden=hidden, dense_hidden=dense_hidden, tokens=tokens, batch=batch,
                moe_seconds=t_moe, dense_seconds=t_dense, moe_over_dense=t_moe / t_dense)


def main(argv: list[str] | None = None) -> dict:
    """Run the suite and write OUT/train.json."""
    parser = make_parser("python -m benchmarks.bench_train", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the speed")
    parser.add_argument("--presets", nargs="+", default=["MicroDiT_Tiny_2", "MicroDiT_XL_2"], help="networks timed")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per timed step")
    renamed(parser, "--batch", "--batch-size")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (the median is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to time")
    parser.add_argument("--reference", type=Path, default=None, metavar="DIR",
                        help="a local checkout of SonyResearch/micro_diffusion: time its network beside ours")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    latent, caption, overrides = (8, (7, 32), QUICK) if args.quick else (32, (77, 1024), {})
    dtype = compute_dtype(device)
    peak = 1e3 * matmul_peak_tflops(device, dtype, size=512 if args.quick else 2048,
                                    seconds=0.25 if args.quick else 2.0)
    print(f"{dtype_name(dtype)} matmul peak on {device_name(device)}: {peak:.1f} GFLOP/s (the dtype every step below "
          "runs in)", flush=True)
    spec_peak = spec_peak_gflops(device, dtype)
    repeats = 1 if args.quick else args.repeats
    jobs = [(name, args.batch_size, latent, caption, repeats, overrides, args.device, peak, spec_peak)
            for name in args.presets]
    # each preset in a fresh process: the peak-memory reading of one preset must not include another's
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        rows = [row for result in pool.map(bench_preset, jobs, chunksize=1) for row in result]
    moe = bench_moe(64, 128, 64, 2, device, 1, dtype) if args.quick else \
        bench_moe(1024, 768, 256, args.batch_size, device, 9, dtype)
    print(f"MoE layer / dense FFN of equal FLOPs: {moe['moe_over_dense']:.2f}x", flush=True)
    result = dict(device=device_name(device), dtype=dtype_name(dtype), matmul_peak_gflops=peak,
                  device_peak_gflops=spec_peak, quick=args.quick,
                  latent=latent, caption=list(caption), runs=rows, moe=moe, speedups=speedups(rows))
    if args.reference is not None:  # the presets at their own size (the reference has no other), even with --quick
        result["reference"] = [side_by_side(args.reference, name, args.batch_size, latent, caption,
                                            SIDE_BY_SIDE_MASK, device, args.repeats) for name in args.presets]
    write_result(args.out, "train_quick" if args.quick else "train", result)
    return result


def side_by_side(checkout: Path, preset: str, batch: int, latent: int, caption: tuple[int, int], mask: float,
                 device: torch.device, rounds: int) -> dict:
    """Our network and the reference's in this process, alternating rounds of one timed step each on the same
    inputs (same seed: same latents, captions, noise levels and noise); best round of each, and the ratio."""
    from benchmarks.reference import create_reference

    nets = {"ours": create_dit(preset, latent_size=latent, caption_dim=caption[1]).to(device),
            "reference": create_reference(checkout, preset, latent, caption[1]).to(device)}
    steps = {}
    for name, net in nets.items():
        torch.manual_seed(0)  # the same inputs for both
        steps[name] = step_fn(net, batch, latent, caption, mask, device, compute_dtype(device), seeded_patches=False)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for r in range(rounds):
        for name, step in steps.items():
            times[name].append(time_fn(step, device, warmup=1 if r == 0 else 0, repeats=1))
    best = {name: min(t) for name, t in times.items()}
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    print(f"{preset} mask {mask:.2f} side by side: ours {best['ours']:.2f} s, reference {best['reference']:.2f} s "
          f"(best of {rounds} alternating): {best['reference'] / best['ours']:.2f}x", flush=True)
    return dict(preset=preset, mask_ratio=mask, batch=batch, rounds=rounds, reference_dir=str(checkout),
                ours_seconds=best["ours"], reference_seconds=best["reference"], ours_all=times["ours"],
                reference_all=times["reference"], ours_params=params["ours"], reference_params=params["reference"],
                speedup=best["reference"] / best["ours"])


def spec_peak_gflops(device: torch.device, dtype: torch.dtype | None = None) -> float | None:
    """The GPU's dense peak in `dtype` (None: the device's compute dtype) from the price table, for MFU; None on CPU
    or a GPU the table lacks."""
    if device.type != "cuda":
        return None
    try:
        tabled = device_spec(detect_device_type(True)).peak(dtype or compute_dtype(device))
    except KeyError:
        return None
    return tabled * 1e3 if tabled else None


def speedups(rows: list[dict]) -> list[dict]:
    """Masking speed-up (0.75 against 0) per preset next to its FLOP ratio, and deferred against naive cost."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        by = {(r["masking"], r["mask_ratio"]): r for r in rows if r["preset"] == preset}
        full, masked, naive = by[("deferred", 0.0)], by[("deferred", 0.75)], by[("naive", 0.75)]
        time_ratio = full["seconds"] / masked["seconds"]
        flop_ratio = full["gflop_per_image"] / masked["gflop_per_image"]
        out.append(dict(preset=preset, time_speedup=time_ratio, flop_ratio=flop_ratio,
                        speedup_over_flop_ratio=time_ratio / flop_ratio,
                        deferred_over_naive_seconds=masked["seconds"] / naive["seconds"]))
    return out


if __name__ == "__main__":
    main()
