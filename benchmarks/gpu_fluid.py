"""gpu-check's Fluid items: a training step of recipes/fluid_256.yaml's network at its per-device microbatch, and
sampling images/s at 256 px with Fluid's default sampler (64 passes, 100 head steps, guidance 5)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.common import peak_memory_mb, time_fn
from micro_diffusion import recipe
from micro_diffusion.cost.fluid_flops import fluid_train_flops_per_sample
from micro_diffusion.diffusion.sampling import FLUID_DEFAULTS, SamplingSettings
from micro_diffusion.families import FAMILIES
from micro_diffusion.models.fluid import create_fluid
from micro_diffusion.utils.devices import autocast, dtype_name
from micro_diffusion.utils.seeds import seeded_generator

Check = Any  # benchmarks.gpu_check.Check (imported there, so not here: no cycle)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fluid_256.yaml"
TINY = dict(preset="Fluid_Micro", latent=8, microbatch=2, caption=[7, 32])  # the harness on a CPU


def fluid_settings(tiny: bool) -> dict:
    """Preset, latent side, microbatch and caption shape of the Fluid recipe (shrunk in tiny mode)."""
    cfg = recipe.load_recipe(RECIPE)
    m = cfg["model"]
    out = dict(stage=cfg["stage"], preset=m["preset"], resolution=cfg["data"]["resolution"],
               latent=recipe.latent_size(cfg), microbatch=cfg["train"]["device_microbatch"],
               caption=[m["caption_len"], m["caption_dim"]], channels=m["latent_channels"],
               sigma_data=cfg["diffusion"]["sigma_data"])
    if tiny:
        out.update(TINY, recipe_microbatch=out["microbatch"], recipe_preset=out["preset"])
    return out


def build_fluid(s: dict, device: torch.device) -> torch.nn.Module:
    """The recipe's Fluid network, built on the device."""
    torch.manual_seed(0)
    with device:
        return create_fluid(s["preset"], latent_size=s["latent"], in_channels=s["channels"],
                            caption_dim=s["caption"][1])


def fluid_train_step(check: Check, net: torch.nn.Module, s: dict, device: torch.device, dtype: torch.dtype,
                     peak: tuple[float, str], repeats: int) -> None:
    """s/step, images/s, MFU and peak memory of Fluid's forward+backward (its family's training loss)."""
    x0 = torch.randn(s["microbatch"], s["channels"], s["latent"], s["latent"], device=device)
    y = torch.randn(s["microbatch"], *s["caption"], device=device)
    gens = (seeded_generator(0, device), seeded_generator(1, device))
    d = {"mask_ratio": None, "p_mean": None, "p_std": None, "sigma_data": s["sigma_data"]}

    def step() -> None:
        with autocast(device, dtype):
            loss = FAMILIES["fluid"].loss(net, x0, y, d, gens)
        loss.backward()
        net.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_fn(step, device, warmup=1, repeats=repeats)
    flops = fluid_train_flops_per_sample(net, s["latent"], s["caption"][0]) * s["microbatch"]  # expected ratio
    cfg = {**s, "dtype": dtype_name(dtype), "params": sum(p.numel() for p in net.parameters())}
    check.add("fluid_train_s_per_step", cfg, seconds, "s")
    check.add("fluid_train_images_per_s", cfg, s["microbatch"] / seconds, "images/s")
    check.add("fluid_train_mfu", {**cfg, "peak_tflops": peak[0], "peak_source": peak[1],
                                  "tflop_per_step": flops / 1e12}, flops / seconds / (peak[0] * 1e12), "fraction")
    check.add("fluid_train_peak_memory", cfg, peak_memory_mb(device) * 2**20 / 2**30, "GiB")


def fluid_sampling(check: Check, net: torch.nn.Module, s: dict, device: torch.device, dtype: torch.dtype,
                   batch: int, tiny: bool) -> None:
    """Guided sampling images/s with the fluid sampler at Fluid's defaults (a few passes at tiny size)."""
    settings = SamplingSettings(steps=2, guidance=FLUID_DEFAULTS.guidance, sampler="fluid", temperature=0.975,
                                head_steps=5) if tiny else FLUID_DEFAULTS
    cond = torch.randn(batch, *s["caption"], device=device)
    null = torch.zeros(*s["caption"], device=device)
    shape = (s["channels"], s["latent"], s["latent"])
    net.eval()
    with autocast(device, dtype):
        seconds = time_fn(lambda: FAMILIES["fluid"].generate(net, cond, null, settings, list(range(batch)), shape,
                                                             s["sigma_data"]), device, warmup=0, repeats=1)
    net.train()
    cfg = dict(resolution=s["resolution"], latent=s["latent"], batch=batch, **settings.to_dict(),
               dtype=dtype_name(dtype))
    check.add("fluid_sample_images_per_s", cfg, batch / seconds, "images/s")
