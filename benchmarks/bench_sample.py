"""Sampling benchmark: images/s of EDM Heun with classifier-free guidance, batch 8, 77x1024 caption tokens.

    python benchmarks/bench_sample.py            # Tiny at 32x32 latents, 30 steps (about a minute on 2 CPU cores)
    python benchmarks/bench_sample.py --quick    # a tiny network, 2 steps: checks the harness runs
Sampling runs in the device's compute dtype (bf16 autocast on CUDA and on CPUs with native bf16, else fp32); the
result's `dtype` says which.
"""
from __future__ import annotations

import torch

from benchmarks.common import QUICK, add_out_argument, bench_device, device_name, time_fn, write_result
from micro_diffusion.cost.flops import sample_flops_per_image
from micro_diffusion.diffusion.edm import SIGMA_DATA, EDMPrecond
from micro_diffusion.diffusion.sampling import (
    DEFAULTS,
    SAMPLERS,
    guided_denoiser,
    network_evals,
    sample,
    sampler_options,
)
from micro_diffusion.models import create_dit
from micro_diffusion.utils.argparsing import parser, renamed
from micro_diffusion.utils.devices import autocast, compute_dtype, dtype_name


def main(argv: list[str] | None = None) -> dict:
    """Time one batch of guided sampling and write OUT/sample.json."""
    p = parser("python -m benchmarks.bench_sample", __doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the speed")
    p.add_argument("--preset", default="MicroDiT_Tiny_2", help="network timed")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together")
    renamed(p, "--batch", "--batch-size")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="noise levels")
    p.add_argument("--guidance", type=float, default=DEFAULTS.guidance, help="classifier-free guidance scale")
    p.add_argument("--sampler", default=DEFAULTS.sampler, choices=sorted(SAMPLERS), help="sampler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to time")
    add_out_argument(p)
    args = p.parse_args(argv)
    device = bench_device(args.device)
    dtype, batch = compute_dtype(device), args.batch_size
    latent, caption, overrides, steps = (8, (7, 32), QUICK, 2) if args.quick else (32, (77, 1024), {}, args.steps)
    torch.manual_seed(0)
    net = create_dit(args.preset, latent_size=latent, caption_dim=caption[1], **overrides).to(device).eval()
    captions = torch.randn(batch, *caption, device=device)
    denoiser = guided_denoiser(EDMPrecond(net, SIGMA_DATA), captions, torch.zeros(*caption), args.guidance)
    noise = torch.randn(batch, 4, latent, latent, device=device)

    levels = {"sigma_data": SIGMA_DATA} if "sigma_data" in sampler_options(args.sampler) else {}  # consistency's

    @torch.no_grad()
    def run() -> None:
        with autocast(device, dtype):
            sample(denoiser, noise, steps=steps, sampler=args.sampler, **levels)

    seconds = time_fn(run, device, warmup=0 if not args.quick else 1, repeats=1)
    flops = sample_flops_per_image(net, latent_size=latent, caption_len=caption[0], steps=steps, sampler=args.sampler,
                                   guidance=args.guidance != 1.0)
    result = dict(device=device_name(device), dtype=dtype_name(dtype), preset=args.preset, quick=args.quick,
                  batch=batch, steps=steps,
                  sampler=args.sampler, guidance=args.guidance, network_evaluations=network_evals(steps, args.sampler),
                  seconds=seconds,
                  images_per_s=batch / seconds, gflop_per_image=flops / 1e9,
                  gflop_per_s=flops * batch / seconds / 1e9)
    print(f"{args.preset} sampling: {result['images_per_s']:.2f} images/s ({steps} {args.sampler} steps, guidance "
          f"{args.guidance}, batch {batch}, {dtype_name(dtype)}, {result['gflop_per_s']:.0f} GFLOP/s)", flush=True)
    write_result(args.out, "sample_quick" if args.quick else "sample", result)
    return result


if __name__ == "__main__":
    main()
