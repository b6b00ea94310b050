"""Diffusion math only: the EDM denoiser and its loss, noise schedules, samplers, guidance, the sampling path."""
from .edm import SIGMA_DATA, EDMPrecond
from .sampling import DEFAULTS, SamplingSettings, cfg_denoiser, generate_latents, image_seeds, sample

__all__ = ["DEFAULTS", "SIGMA_DATA", "EDMPrecond", "SamplingSettings", "cfg_denoiser", "generate_latents",
           "image_seeds", "sample"]
