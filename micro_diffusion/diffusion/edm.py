"""EDM (Karras et al. 2022): preconditioning, training noise levels and the masked loss, as the paper writes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIGMA_DATA = 0.9  # std of SDXL-VAE latents after the VAE's scaling factor


def c_skip(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Skip-connection weight: sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Output scale: sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Input scale: 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning: ln(sigma) / 4."""
    return sigma.log() / 4


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def training_sigmas(
    n: int, p_mean: float, p_std: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Log-normal noise levels: ln(sigma) ~ N(P_mean, P_std^2), shape (n,)."""
    gen_device = generator.device if generator is not None else device
    return (torch.randn(n, generator=generator, device=gen_device).to(device) * p_std + p_mean).exp()


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1)


def denoise(net, x: torch.Tensor, sigma: torch.Tensor, caption_tokens: torch.Tensor, sigma_data: float = SIGMA_DATA,
            mask_ratio: float = 0.0, generator: torch.Generator | None = None):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): returns (D, mask) with the network's (N, T) mask or None."""
    sigma = sigma.float().reshape(-1)  # (N,)
    out = net(_bc(c_in(sigma, sigma_data)).to(x.dtype) * x, c_noise(sigma), caption_tokens, mask_ratio, generator)
    return _bc(c_skip(sigma, sigma_data)) * x + _bc(c_out(sigma, sigma_data)) * out.sample.float(), out.mask


def patch_mask_to_pixels(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, T) patch mask, row-major over the patch grid -> (N, 1, H, W) pixel mask of the latent."""
    m = mask.reshape(mask.shape[0], 1, *grid).float()  # (N, 1, h, w)
    return F.interpolate(m, scale_factor=patch_size, mode="nearest")  # (N, 1, H, W)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """Per-sample mean squared error over kept patches only (all patches when mask is None): (N,)."""
    err = (pred.float() - target.float()) ** 2  # (N, C, H, W)
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    grid = (pred.shape[2] // patch_size, pred.shape[3] // patch_size)
    keep = 1.0 - patch_mask_to_pixels(mask, grid, patch_size)  # (N, 1, H, W), 1 where the patch was kept
    return (err * keep).sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) * pred.shape[1])


def edm_loss(net, x0: torch.Tensor, caption_tokens: torch.Tensor, p_mean: float = -0.6, p_std: float = 1.2,
             sigma_data: float = SIGMA_DATA, mask_ratio: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM training loss: E[lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2], over unmasked patches only."""
    sigma = training_sigmas(x0.shape[0], p_mean, p_std, x0.device, generator)  # (N,)
    gen_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device, x0.dtype)  # (N, C, H, W)
    denoised, mask = denoise(net, x0 + _bc(sigma).to(x0.dtype) * noise, sigma, caption_tokens, sigma_data,
                             mask_ratio, generator)
    return (loss_weight(sigma, sigma_data) * masked_mse(denoised, x0, mask, net.patch_size)).mean()
