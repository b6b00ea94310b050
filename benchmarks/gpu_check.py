"""Qualify a CUDA machine before installing the stack: the recipes' XL steps, attention, MoE, compile and sampling.

Runs on the system python of a bare GPU box (torch, numpy and PyYAML; no Composer, no Streaming, no `make install`):
    make gpu-check                                   # GPU_CHECK_PY=python3, results in runs/gpu_check/
    python3 -m benchmarks.gpu_check --out DIR        # the same; --budget S stops starting new items after S seconds
Measures, within the time budget (4 minutes by default): XL forward+backward of each stage recipe at its per-device
microbatch (s/step, images/s, MFU against the device's dense peak in the dtype that ran, peak memory, whether the
stage fits in 80 GB with the 1/8 FSDP share of fp32 master weights and Adam state added); flash SDPA against the
plain attention path; the MoE dispatch against a per-expert loop and a dense FFN of equal FLOPs; torch.compile of one
block; guided sampling images/s at 512 px; a Fluid 369M training step (recipes/fluid_256.yaml's microbatch) and Fluid
sampling images/s at 256 px (benchmarks/gpu_fluid.py). Without CUDA (or with --quick) the same code runs at a tiny
size in well under a minute.
Everything computes in the device's compute dtype (utils.devices.compute_dtype: bf16 autocast on CUDA and on CPUs with
native bf16, else fp32); JSON and table say which (`dtype`), and MFU divides by the peak of that dtype.
Writes OUT/gpu_check.json (records: name, config, value, unit, and error where a measurement failed) and
OUT/gpu_check.md. Every measurement is guarded: an out-of-memory or any other error becomes an error record and the
rest run; the exit status is 1 when a measurement failed for another reason than memory.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.bench_train import bench_moe, step_fn
from benchmarks.common import QUICK, bench_device, device_name, peak_memory_mb, time_fn
from benchmarks.gpu_fluid import build_fluid, fluid_sampling, fluid_settings, fluid_train_step
from micro_diffusion import recipe
from micro_diffusion.cost.flops import train_flops_per_sample
from micro_diffusion.cost.prices import run_peak_tflops
from micro_diffusion.diffusion import DEFAULTS, SIGMA_DATA, EDMPrecond, SamplingSettings, generate_latents
from micro_diffusion.models import create_dit
from micro_diffusion.models.attention import attention, plain_attention
from micro_diffusion.models.ffn import ExpertChoiceMoE
from micro_diffusion.utils.argparsing import parser, renamed
from micro_diffusion.utils.devices import autocast, compute_dtype, dtype_name

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STAGES = ("res256_masked", "res256_finetune", "res512_masked", "res512_finetune")
H100_BYTES = 80e9  # "fits in 80 GB": an H100's memory
FSDP_DEVICES = 8
SHARDED_BYTES_PER_PARAM = 4 + 8  # fp32 master weights + Adam's two fp32 moments, sharded over FSDP_DEVICES
TINY_SCALE = 4  # tiny mode: latent sides divided by this, microbatch TINY_BATCH, QUICK network, caption TINY_CAPTION
TINY_BATCH, TINY_CAPTION = 2, (7, 32)
SHOWN = ("stage", "microbatch", "mask_ratio", "shape", "tokens", "batch", "predicted_gib", "steps")  # table columns
TINY_NET = {**QUICK, "depth": 3}  # three backbone blocks: block 1 carries an MoE (never the last block)


class Check:
    """Collects records, runs each measurement guarded and stops starting new ones once the budget is spent."""

    def __init__(self, budget_s: float):
        self.budget_s, self.start, self.records = budget_s, time.monotonic(), []

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.monotonic() - self.start

    def add(self, name: str, config: dict, value: Any, unit: str, error: str | None = None) -> None:
        """One record; printed as it comes."""
        row = dict(name=name, config=config, value=value, unit=unit)
        if error is not None:
            row["error"] = error
        self.records.append(row)
        shown = f"ERROR {error}" if error else f"{value:.4g} {unit}" if isinstance(value, float) else f"{value} {unit}"
        print(f"[{self.elapsed():6.1f} s] {name:28s} {shown}", flush=True)

    def run(self, name: str, config: dict, fn: Callable[[], None]) -> None:
        """Run one measurement; a failure or a spent budget becomes an error record and the check goes on."""
        if self.elapsed() > self.budget_s:
            self.add(name, config, None, "", f"skipped: the time budget of {self.budget_s:.0f} s is spent")
            return
        try:
            fn()
        except torch.cuda.OutOfMemoryError as err:
            self.add(name, config, None, "", f"out of memory: {str(err).splitlines()[0]}")
        except Exception as err:  # noqa: BLE001 - recorded with its traceback's last line, the check goes on
            self.add(name, config, None, "", f"{type(err).__name__}: {err} ({traceback.format_exc().splitlines()[-3]})")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def failed(self) -> list[dict]:
        """Error records other than out-of-memory and skipped items."""
        return [r for r in self.records if r.get("error") and not r["error"].startswith(("out of memory", "skipped"))]


def stage_settings(stage: str, tiny: bool) -> dict:
    """Preset, latent side, mask ratio, microbatch and caption shape of a stage recipe (shrunk in tiny mode)."""
    cfg = recipe.load_recipe(RECIPES / f"{stage}.yaml")
    m, side = cfg["model"], recipe.latent_size(cfg)
    out = dict(stage=stage, preset=m["preset"], resolution=cfg["data"]["resolution"], latent=side,
               mask_ratio=cfg["diffusion"]["mask_ratio"], microbatch=cfg["train"]["device_microbatch"],
               caption=[m["caption_len"], m["caption_dim"]], channels=m["latent_channels"])
    if tiny:
        out.update(latent=side // TINY_SCALE, microbatch=TINY_BATCH, caption=list(TINY_CAPTION), overrides=TINY_NET,
                   recipe_microbatch=out["microbatch"], recipe_latent=side)
    return out


def build(s: dict, device: torch.device) -> torch.nn.Module:
    """The stage's network, built on the device (an XL init on the CPU first would take seconds); it runs at every
    stage's latent size, since positions are computed for the input's grid."""
    torch.manual_seed(0)
    with device:
        return create_dit(s["preset"], latent_size=s["latent"], in_channels=s["channels"], caption_dim=s["caption"][1],
                          **s.get("overrides", {}))


def dense_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's dense peak in `dtype` from the price table, else (CPUs, unknown GPUs) the measured matmul peak."""
    return run_peak_tflops(device, dtype, size=512 if device.type == "cpu" else 8192)


def train_step(check: Check, net: torch.nn.Module, s: dict, device: torch.device, dtype: torch.dtype,
               peak: tuple[float, str], repeats: int) -> None:
    """s/step, images/s, MFU, peak memory and the 80 GB verdict of one stage's forward+backward."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = time_fn(step_fn(net, s["microbatch"], s["latent"], tuple(s["caption"]), s["mask_ratio"], device,
                                  dtype), device, warmup=1, repeats=repeats)
    finally:  # an out-of-memory in backward leaves partial gradients behind
        net.zero_grad(set_to_none=True)
    flops = train_flops_per_sample(net, latent_size=s["latent"], caption_len=s["caption"][0],
                                   mask_ratio=s["mask_ratio"]) * s["microbatch"]
    params = sum(p.numel() for p in net.parameters())
    peak_bytes = peak_memory_mb(device) * 2**20
    stage_bytes = peak_bytes + params * SHARDED_BYTES_PER_PARAM / FSDP_DEVICES
    cfg = {**s, "dtype": dtype_name(dtype), "params": params}
    check.add("train_s_per_step", cfg, seconds, "s")
    check.add("train_images_per_s", cfg, s["microbatch"] / seconds, "images/s")
    check.add("train_mfu", {**cfg, "peak_tflops": peak[0], "peak_source": peak[1], "tflop_per_step": flops / 1e12},
              flops / seconds / (peak[0] * 1e12), "fraction")
    check.add("train_peak_memory", {**cfg, "measured": "CUDA allocator peak" if device.type == "cuda"
                                    else "process peak resident set"}, peak_bytes / 2**30, "GiB")
    added = f"1/{FSDP_DEVICES} of {SHARDED_BYTES_PER_PARAM} B/param (fp32 master + Adam)"
    check.add("train_fits_80gb", {**cfg, "predicted_gib": stage_bytes / 2**30, "limit_gib": H100_BYTES / 2**30,
                                  "added": added},
              bool(stage_bytes <= H100_BYTES), "bool")


def attention_check(check: Check, s: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Flash SDPA (CUDA; the default SDPA kernel on CPU) against the plain three products: outputs and fwd+bwd time."""
    heads, d = 16, 64
    if "overrides" in s:
        heads, d = 4, s["overrides"]["head_dim"]
    tokens = (s["latent"] // 2) ** 2
    q, k, v = (torch.randn(s["microbatch"], heads, tokens, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    backend = "flash" if device.type == "cuda" else "default"
    cfg = dict(shape=list(q.shape), dtype=dtype_name(dtype), backend=backend, tolerance=2e-2)

    def fused() -> torch.Tensor:
        if device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def plain() -> torch.Tensor:
        with plain_attention():
            return attention(q, k, v)

    with torch.no_grad():
        diff = (fused().float() - plain().float()).abs().max().item()
    error = None if diff <= cfg["tolerance"] else f"outputs differ: max abs diff {diff:.3g} > {cfg['tolerance']}"
    check.add("attention_max_abs_diff", cfg, diff, "abs", error)
    t_fused = time_fn(lambda: fused().sum().backward(), device, warmup=1, repeats=5)
    t_plain = time_fn(lambda: plain().sum().backward(), device, warmup=1, repeats=5)
    check.add("attention_fused_ms", cfg, 1e3 * t_fused, "ms")
    check.add("attention_plain_over_fused", cfg, t_plain / t_fused, "x")


def moe_reference(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The expert-choice layer as a loop over samples and experts: what the batched dispatch must equal."""
    gates, idx = moe.route(x)  # (N, E, C)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for e in range(moe.num_experts):
            h = F.gelu(x[n, idx[n, e]] @ moe.w_in[e], approximate="tanh") @ moe.w_out[e]  # (C, D)
            out[n].index_add_(0, idx[n, e], h * gates[n, e, :, None].to(h.dtype))
    return out  # (N, T, D)


def moe_check(check: Check, net: torch.nn.Module, s: dict, device: torch.device, dtype: torch.dtype,
              repeats: int) -> None:
    """The first backbone MoE layer's dispatch against the loop (fp32), then its fwd+bwd time against a dense FFN."""
    moe = next(m for m in net.blocks.modules() if isinstance(m, ExpertChoiceMoE))
    dim, hidden = moe.w_in.shape[1:]
    tokens = round((s["latent"] // 2) ** 2 * (1 - s["mask_ratio"]))
    x = torch.randn(min(s["microbatch"], 4), tokens, dim, device=device)
    with torch.no_grad():
        diff = (moe(x) - moe_reference(moe, x)).abs().max().item()
    cfg = dict(dim=dim, hidden=hidden, experts=moe.num_experts, tokens=tokens, batch=x.shape[0], dtype="float32",
               tolerance=1e-4)
    error = None if diff <= cfg["tolerance"] else f"dispatch differs from the loop: {diff:.3g} > {cfg['tolerance']}"
    check.add("moe_dispatch_max_abs_diff", cfg, diff, "abs", error)
    r = bench_moe(dim, hidden, tokens, s["microbatch"], device, repeats, dtype)
    cfg = {**cfg, "batch": s["microbatch"], "dtype": dtype_name(dtype), "dense_hidden": r["dense_hidden"]}
    check.add("moe_fwd_bwd_ms", cfg, 1e3 * r["moe_seconds"], "ms")
    check.add("moe_over_dense_ffn", cfg, r["moe_over_dense"], "x")


def compile_check(check: Check, net: torch.nn.Module, s: dict, device: torch.device, dtype: torch.dtype,
                  repeats: int, backend: str) -> None:
    """One backbone block eager and under torch.compile: compile time (first call), step times, equal outputs."""
    block = net.blocks[1]
    D, tokens = net.cfg.width, round((s["latent"] // 2) ** 2 * (1 - s["mask_ratio"]))
    x = torch.randn(s["microbatch"], tokens, D, device=device, requires_grad=True)
    c = torch.randn(s["microbatch"], D, device=device)
    y = torch.randn(s["microbatch"], s["caption"][0], D, device=device)
    compiled = torch.compile(block, backend=backend)

    def step(fn: Callable) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with autocast(device, dtype):
                out = fn(x, c, y)
            out.float().sum().backward()
            return out
        return run

    cfg = dict(block=1, moe=isinstance(block.ffn, ExpertChoiceMoE), tokens=tokens, batch=s["microbatch"], width=D,
               dtype=dtype_name(dtype), backend=backend)
    start = time.perf_counter()
    out_c = step(compiled)()
    check.add("compile_first_call_s", cfg, time.perf_counter() - start, "s")
    out_e = step(block)()
    diff = (out_c.float() - out_e.float()).abs().max().item()
    error = None if diff <= 5e-2 else f"compiled block differs from eager: {diff:.3g} > 0.05"
    check.add("compile_max_abs_diff", {**cfg, "tolerance": 5e-2}, diff, "abs", error)
    t_eager = time_fn(step(block), device, warmup=1, repeats=repeats)
    t_comp = time_fn(step(compiled), device, warmup=1, repeats=repeats)
    check.add("block_eager_ms", cfg, 1e3 * t_eager, "ms")
    check.add("block_compiled_ms", cfg, 1e3 * t_comp, "ms")
    check.add("compile_speedup", cfg, t_eager / t_comp, "x")
    net.zero_grad(set_to_none=True)


def sampling_check(check: Check, net: torch.nn.Module, s: dict, device: torch.device, dtype: torch.dtype, batch: int,
                   steps: int) -> None:
    """Guided sampling images/s on the project's one sampling path (Heun, guidance scale as the defaults)."""
    settings = SamplingSettings(steps=steps, guidance=DEFAULTS.guidance, sampler=DEFAULTS.sampler)
    cond = torch.randn(batch, *s["caption"], device=device)
    null = torch.zeros(*s["caption"], device=device)
    net.eval()
    generate = lambda: generate_latents(EDMPrecond(net, SIGMA_DATA), cond, null, settings,  # noqa: E731
                                        list(range(batch)), (s["channels"], s["latent"], s["latent"]))
    with autocast(device, dtype):
        seconds = time_fn(generate, device, warmup=0, repeats=1)
    net.train()
    cfg = dict(resolution=s["resolution"], latent=s["latent"], batch=batch, **settings.to_dict(),
               dtype=dtype_name(dtype))
    check.add("sample_images_per_s", cfg, batch / seconds, "images/s")


def table(records: list[dict]) -> str:
    """The records as a markdown table."""
    lines = ["| measurement | config | value | unit |", "| --- | --- | --- | --- |"]
    for r in records:
        c = r["config"]
        short = ", ".join(f"{k}={c[k]:.4g}" if isinstance(c[k], float) else f"{k}={c[k]}" for k in SHOWN if k in c)
        value = f"**{r['error']}**" if r.get("error") else f"{r['value']:.4g}" if isinstance(r["value"], float) \
            else str(r["value"])
        lines.append(f"| {r['name']} | {short} | {value} | {r['unit']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every measurement within the budget, write OUT/gpu_check.json and OUT/gpu_check.md; 1 if one failed."""
    p = parser("python -m benchmarks.gpu_check", __doc__)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="result folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to measure")
    p.add_argument("--quick", action="store_true", help="tiny sizes (always on CPU): checks the harness")
    renamed(p, "--tiny", "--quick")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (None: inductor; aot_eager at tiny size, where inductor's "
                        "C++ build takes minutes on a CPU)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds after which no new item starts")
    args = p.parse_args(argv)
    device = bench_device(args.device)
    dtype = compute_dtype(device)
    tiny = args.quick or device.type == "cpu"
    repeats = 1 if tiny else 3
    backend = args.compile_backend or ("aot_eager" if tiny else "inductor")
    check = Check(args.budget)
    stages = [stage_settings(name, tiny) for name in STAGES]
    peak = dense_peak_tflops(device, dtype)
    nets: dict[str, torch.nn.Module] = {}  # one network per preset: positions are computed for any latent size

    def net(s: dict) -> torch.nn.Module:
        if s["preset"] not in nets:
            nets[s["preset"]] = build(s, device)
        return nets[s["preset"]]

    for s in stages:
        check.run("train_step", s, lambda s=s: train_step(check, net(s), s, device, dtype, peak, repeats))
    s256, s512 = stages[0], stages[-1]  # 256 px masked (the MoE and compile sizes), 512 px unmasked
    check.run("attention", s512, lambda: attention_check(check, s512, device, dtype))
    check.run("moe", s256, lambda: moe_check(check, net(s256), s256, device, dtype, repeats))
    check.run("compile", s256, lambda: compile_check(check, net(s256), s256, device, dtype, repeats, backend))
    check.run("sampling", s512, lambda: sampling_check(check, net(s512), s512, device, dtype,
                                                       batch=2 if tiny else 8, steps=2 if tiny else DEFAULTS.steps))
    fluid = fluid_settings(tiny)
    fluid_net: list[torch.nn.Module] = []  # built once, on first use

    def fnet() -> torch.nn.Module:
        if not fluid_net:
            nets.clear()  # the XL networks' memory goes back before the Fluid one is built
            fluid_net.append(build_fluid(fluid, device))
        return fluid_net[0]

    check.run("fluid_train_step", fluid, lambda: fluid_train_step(check, fnet(), fluid, device, dtype, peak, repeats))
    check.run("fluid_sampling", fluid, lambda: fluid_sampling(check, fnet(), fluid, device, dtype,
                                                              batch=2 if tiny else 8, tiny=tiny))
    result = dict(device=device_name(device), dtype=dtype_name(dtype), torch=torch.__version__, cuda=torch.version.cuda,
                  tiny=tiny,
                  budget_s=args.budget, elapsed_s=check.elapsed(), records=check.records)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(f"GPU check on {result['device']} in {result['dtype']} (torch "
                                           f"{torch.__version__}, {check.elapsed():.0f} s)\n\n" + table(check.records))
    failed = check.failed()
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md: {len(check.records)} records in {result['dtype']}, "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
