"""The model families, in one table: MicroDiT (EDM diffusion of whole latents) and Fluid (random-order autoregression
of continuous tokens with a per-token diffusion head).

`FAMILIES[name]` is everything the rest of the project asks of a family: its presets and network, its training and
validation loss, its sampling path and default sampler, its FLOP counts, the recipe keys it reads and the checks of
its network. Recipes and exports name the family (`model.family`, config.json "family"; "dit" when absent, as in
exports written before Fluid). Training, export, sampling, evaluation, sweeps, experiments, the ledger, estimates and
the dry run go through this table; no other module branches on a family.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .cost.flops import sample_flops_per_image, train_flops_per_sample
from .cost.fluid_flops import fluid_sample_flops_per_image, fluid_train_flops_per_sample
from .diffusion.edm import EDMPrecond
from .diffusion.fluid import fluid_loss, generate_fluid
from .diffusion.head import HeadSchedule
from .diffusion.sampling import DEFAULTS, FLUID_DEFAULTS, SamplingSettings, generate_latents
from .errors import UsageError
from .models import DiTConfig, create_dit
from .models.blocks import DiTBlock
from .models.fluid import FLUID_PRESETS, Fluid, FluidConfig, create_fluid
from .models.patches import patch_grid
from .models.presets import PRESETS
from .utils.modes import module_mode
from .utils.seeds import draw

Generators = tuple[torch.Generator | None, torch.Generator | None]  # (noise, masks) of one microbatch
DEFAULT_FAMILY = "dit"  # recipes and exports that name no family
HEAD_SCHEDULE = HeadSchedule.cosine(1000)  # Fluid's head: 1000 cosine steps in training (MAR)


@dataclass(frozen=True)
class Family:
    """One model family: how it is built, trained, sampled and counted."""

    name: str
    title: str  # for messages and reports
    presets: Mapping[str, Callable[[], Any]]  # preset name -> config factory
    config_type: type
    create: Callable[..., nn.Module]  # create(preset, latent_size=, in_channels=, caption_dim=, **overrides)
    block_types: tuple[type, ...]  # the transformer blocks (FSDP units)
    diffusion_keys: tuple[str, ...]  # the recipe's diffusion.* keys it reads; the others must be null
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, Any], Generators], torch.Tensor]
    val_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, Any], torch.Generator,
                        torch.Tensor | None], torch.Tensor]
    generate: Callable[[nn.Module, torch.Tensor, torch.Tensor, SamplingSettings, Sequence[int],
                        tuple[int, int, int], float], torch.Tensor]
    train_flops: Callable[[nn.Module, Any, int, Mapping[str, Any]], int]
    sample_flops: Callable[[nn.Module, Any, int, SamplingSettings], int]
    check_network: Callable[[Any, int, int], None]  # (config, latent side, samples.steps): ValueError naming a field
    # default sampling settings for a network config (a dict; {} when unknown)
    sampling_for: Callable[[Mapping[str, Any]], SamplingSettings]
    distills: bool = False  # consistency distillation (recipes with a distill: section) applies
    noise_grid: bool = False  # its validation loss can average over fixed EDM noise levels (eval.sigmas)


# MicroDiT -------------------------------------------------------------------------------------------------------

def _dit_loss(net: nn.Module, x0: torch.Tensor, cond: torch.Tensor, d: Mapping[str, Any],
              gens: Generators) -> torch.Tensor:
    return EDMPrecond(net, d["sigma_data"]).loss(x0, cond, d["p_mean"], d["p_std"], gens[0],
                                                 mask_ratio=d["mask_ratio"], generator=gens[1])


def _dit_val_loss(net: nn.Module, x0: torch.Tensor, cond: torch.Tensor, d: Mapping[str, Any],
                  generator: torch.Generator, sigmas: torch.Tensor | None) -> torch.Tensor:
    denoiser = EDMPrecond(net, d["sigma_data"])
    with module_mode(net, training=False):  # the network as it samples: TREAD routes act in training mode only
        if sigmas is None:
            return denoiser.loss(x0, cond, d["p_mean"], d["p_std"], generator)
        losses = [denoiser.loss_at(x0, cond, s.expand(x0.shape[0]).to(x0.device),
                                   draw("randn", x0.shape, generator, x0.device, x0.dtype)) for s in sigmas]
        return torch.stack(losses).mean()


def _dit_generate(net: nn.Module, cond: torch.Tensor, null: torch.Tensor, settings: SamplingSettings,
                  seeds: Sequence[int], shape: tuple[int, int, int], sigma_data: float) -> torch.Tensor:
    cfg = getattr(net, "cfg", None)  # a wrapped network has none: its forward refuses drop_path itself
    if settings.guidance_mode == "path_drop" and isinstance(cfg, DiTConfig) and not cfg.sprint:
        raise UsageError("guidance_mode path_drop needs a SPRINT network (sprint_encoder_depth / "
                         "sprint_decoder_depth); this network has none: use guidance_mode cfg")
    return generate_latents(EDMPrecond(net, sigma_data), cond, null, settings, seeds, shape)


def _dit_sample_flops(net: nn.Module, latent: Any, caption_len: int, s: SamplingSettings) -> int:
    return sample_flops_per_image(net, latent, caption_len, s.steps, s.sampler, s.guidance != 1.0, s.guidance_mode)


def _check_dit(net: DiTConfig, latent_side: int, steps: int) -> None:
    """Sizes a MicroDiT's layers can be built from (any number of sampling steps)."""
    least = {"width": 4, "depth": 1, "head_dim": 1, "patch_size": 1, "moe_every": 0, "num_experts": 1,
             "patch_mixer_depth": 0, "patch_mixer_width": 1, "pos_base_grid": 1}
    for key, low in least.items():
        if getattr(net, key) < low:
            raise ValueError(f"{key} must be >= {low}, got {getattr(net, key)}")
    if net.capacity_factor <= 0 or net.mixer_ffn_mult <= 0:
        raise ValueError(f"capacity_factor and mixer_ffn_mult must be > 0, got {net.capacity_factor} and "
                         f"{net.mixer_ffn_mult}")
    if net.width % net.head_dim or net.width % 4:
        raise ValueError(f"width {net.width} must be a multiple of head_dim {net.head_dim} and of 4")
    if net.patch_mixer_depth and net.patch_mixer_width % net.head_dim:
        raise ValueError(f"patch_mixer_width {net.patch_mixer_width} must be a multiple of head_dim {net.head_dim}")
    if latent_side % net.patch_size:
        raise ValueError(f"the latent side {latent_side} (data.resolution / data.vae_downsample) is not a multiple "
                         f"of patch_size {net.patch_size}")


# Fluid ----------------------------------------------------------------------------------------------------------

def _fluid_loss(net: nn.Module, x0: torch.Tensor, cond: torch.Tensor, d: Mapping[str, Any],
                gens: Generators) -> torch.Tensor:
    return fluid_loss(net, x0, cond, d["sigma_data"], HEAD_SCHEDULE, generator=gens[1], noise_generator=gens[0])


def _fluid_val_loss(net: nn.Module, x0: torch.Tensor, cond: torch.Tensor, d: Mapping[str, Any],
                    generator: torch.Generator, sigmas: torch.Tensor | None) -> torch.Tensor:
    if sigmas is not None:  # recipe_checks refuses eval.sigmas for Fluid; a direct caller gets the same answer
        raise UsageError("Fluid's validation loss has no EDM noise levels: set eval.sigmas=null")
    return fluid_loss(net, x0, cond, d["sigma_data"], HEAD_SCHEDULE, generator=generator, noise_generator=generator)


def _fluid_generate(net: nn.Module, cond: torch.Tensor, null: torch.Tensor, settings: SamplingSettings,
                    seeds: Sequence[int], shape: tuple[int, int, int], sigma_data: float) -> torch.Tensor:
    s = _fluid_settings(settings)
    null_t = torch.as_tensor(np.asarray(null, dtype=np.float32) if isinstance(null, np.ndarray) else null)
    return generate_fluid(net, cond, null_t.to(cond.device, cond.dtype), list(seeds), s.steps, s.head_steps,
                          s.temperature, s.guidance, shape, sigma_data)


def _fluid_settings(s: SamplingSettings) -> SamplingSettings:
    """Fluid settings with its defaults for the fields left unset."""
    return SamplingSettings(steps=s.steps, guidance=s.guidance, sampler=s.sampler,
                            temperature=FLUID_DEFAULTS.temperature if s.temperature is None else s.temperature,
                            head_steps=FLUID_DEFAULTS.head_steps if s.head_steps is None else s.head_steps)


def _fluid_sample_flops(net: nn.Module, latent: Any, caption_len: int, s: SamplingSettings) -> int:
    s = _fluid_settings(s)
    return fluid_sample_flops_per_image(net, latent, caption_len, s.steps, s.head_steps, s.guidance != 1.0)


def _fluid_sampling_for(network: Mapping[str, Any]) -> SamplingSettings:
    """FLUID_DEFAULTS, with one pass a token in raster order (which reveals one token a pass)."""
    if network.get("order") != "raster":
        return FLUID_DEFAULTS
    gh, gw = patch_grid(network["latent_size"], network["patch_size"])
    return replace(FLUID_DEFAULTS, steps=gh * gw)


def _check_fluid(net: FluidConfig, latent_side: int, steps: int) -> None:
    """A latent a Fluid network can cut into tokens (FluidConfig checks its own sizes when it is made), and in raster
    order, which reveals one token a pass, sampling `steps` equal to the tokens."""
    if net.patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {net.patch_size}")
    if latent_side % net.patch_size:
        raise ValueError(f"the latent side {latent_side} (data.resolution / data.vae_downsample) is not a multiple "
                         f"of patch_size {net.patch_size}")
    tokens = (latent_side // net.patch_size) ** 2
    if net.order == "raster" and steps != tokens:
        raise ValueError(f"samples.steps {steps}: raster order reveals one token a pass, so it takes {tokens} (the "
                         f"tokens of a {latent_side} x {latent_side} latent)")


FAMILIES: dict[str, Family] = {
    "dit": Family(
        name="dit", title="MicroDiT", presets=PRESETS, config_type=DiTConfig, create=create_dit,
        block_types=(DiTBlock,), diffusion_keys=("mask_ratio", "p_mean", "p_std", "sigma_data"),
        loss=_dit_loss, val_loss=_dit_val_loss, generate=_dit_generate,
        train_flops=lambda net, latent, length, d: train_flops_per_sample(net, latent, length, d["mask_ratio"]),
        sample_flops=_dit_sample_flops, check_network=_check_dit, sampling_for=lambda network: DEFAULTS,
        distills=True, noise_grid=True),
    "fluid": Family(
        name="fluid", title="Fluid", presets=FLUID_PRESETS, config_type=FluidConfig, create=create_fluid,
        block_types=Fluid.block_types, diffusion_keys=("sigma_data",),
        loss=_fluid_loss, val_loss=_fluid_val_loss, generate=_fluid_generate,
        train_flops=lambda net, latent, length, d: fluid_train_flops_per_sample(net, latent, length),
        sample_flops=_fluid_sample_flops, check_network=_check_fluid, sampling_for=_fluid_sampling_for),
}


def family(name: str) -> Family:
    """The family of a name; an unknown one is an error listing the known ones."""
    if name not in FAMILIES:
        raise UsageError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: Mapping[str, Any]) -> Family:
    """The family an export's config.json (or a recipe's model section) names; "dit" when it names none."""
    return family(config.get("family") or DEFAULT_FAMILY)


def family_of_preset(preset: str) -> Family | None:
    """The family whose presets hold `preset`, or None."""
    return next((f for f in FAMILIES.values() if preset in f.presets), None)


def check_preset(preset: str, family_name: str, where: str) -> Family:
    """The family of a preset, refused when it is another family's (naming both) or unknown (listing the family's)."""
    fam = family(family_name)
    if preset in fam.presets:
        return fam
    other = family_of_preset(preset)
    if other is not None:
        raise UsageError(f"{where}: {preset} is a {other.title} preset ({other.name}), but the family is "
                         f"{fam.name} ({fam.title}): set model.family={other.name}, or give a {fam.title} preset "
                         f"({', '.join(fam.presets)})")
    raise UsageError(f"{where}: unknown {fam.title} preset {preset!r} (allowed: {', '.join(fam.presets)})")


def config_fields(fam: Family) -> dict[str, Any]:
    """Field name -> type (as a string) of a family's network config."""
    return {f.name: str(f.type) for f in fields(fam.config_type)}
