"""Diffusion math only: EDM preconditioning and loss, noise schedules, samplers and guidance."""
from .edm import SIGMA_DATA, c_in, c_noise, c_out, c_skip, denoise, edm_loss, loss_weight, masked_mse, training_sigmas

__all__ = ["SIGMA_DATA", "c_in", "c_noise", "c_out", "c_skip", "denoise", "edm_loss", "loss_weight", "masked_mse",
           "training_sigmas"]
from .sampling import cfg_denoiser, sample  # noqa: E402,F401
