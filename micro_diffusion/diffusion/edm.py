"""EDM (Karras et al. 2022): preconditioning, training noise levels and the masked loss, as the paper writes them."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..utils.seeds import draw

SIGMA_DATA = 0.9  # the released models' (and the paper recipe's) value: std of SDXL-VAE latents after its scaling


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Skip-connection weight: sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Output scale: sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Input scale: 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning: ln(sigma) / 4."""
    return sigma.log() / 4


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def training_sigmas(
    n: int, p_mean: float, p_std: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Log-normal noise levels: ln(sigma) ~ N(P_mean, P_std^2), shape (n,)."""
    return (draw("randn", (n,), generator, device) * p_std + p_mean).exp()


def sigma_grid(n: int, p_mean: float, p_std: float) -> torch.Tensor:
    """n fixed noise levels: the (i + 1/2) / n quantiles of the training log-normal, (n,), for comparable losses."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (p_mean + p_std * math.sqrt(2) * torch.erfinv(2 * q - 1)).exp().float()


def per_sample(v: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample scalars -> (N, 1, 1, 1), to scale (N, C, H, W) latents."""
    return v.reshape(-1, 1, 1, 1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error over the pixels where keep is 1 (all pixels when keep is None): (N,)."""
    err = (pred.float() - target.float()) ** 2  # (N, C, H, W)
    if keep is None:
        return err.mean(dim=(1, 2, 3))
    return (err * keep).sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) * pred.shape[1])


class EDMPrecond(nn.Module):
    """The denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a network F (EDM, Table 1).

    It owns sigma_data and the EDM loss; keyword arguments for the network (its mask ratio, its patch draw's
    generator) pass through untouched, so the math never depends on how the network is built. The network returns
    an object with `.sample` (N, C, H, W) and `.keep` ((N, 1, H, W) weights of the pixels it predicted, or None).
    """

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, **net_kwargs: Any) -> torch.Tensor:
        """D(x; sigma) for latents x (N, C, H, W), noise levels sigma (N,) or 0-d, conditioning cond (N, L, D)."""
        return self.denoise(x, sigma, cond, **net_kwargs)[0]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                **net_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D(x; sigma) (float32) and the network's keep weights (N, 1, H, W), None when it dropped nothing."""
        sd = self.sigma_data
        sigma = sigma.float().reshape(-1).expand(x.shape[0])  # (N,)
        out = self.net(per_sample(c_in(sigma, sd)).to(x.dtype) * x, c_noise(sigma), cond, **net_kwargs)
        return per_sample(c_skip(sigma, sd)) * x + per_sample(c_out(sigma, sd)) * out.sample.float(), out.keep

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, p_mean: float, p_std: float,
             noise_generator: torch.Generator | None = None, **net_kwargs: Any) -> torch.Tensor:
        """EDM training loss E[lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2] over the pixels the network kept.

        Noise levels and noise come from `noise_generator` (the global RNG when None), separate from any generator
        the network's keyword arguments carry, so the two draws can be seeded independently.
        """
        sigma = training_sigmas(x0.shape[0], p_mean, p_std, x0.device, noise_generator)  # (N,)
        noise = draw("randn", x0.shape, noise_generator, x0.device, x0.dtype)
        return self.loss_at(x0, cond, sigma, noise, **net_kwargs).mean()

    def loss_at(self, x0: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                **net_kwargs: Any) -> torch.Tensor:
        """Per-sample weighted loss lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2 at given sigma and noise: (N,)."""
        x = x0 + per_sample(sigma).to(x0.dtype) * noise  # (N, C, H, W)
        denoised, keep = self.denoise(x, sigma, cond, **net_kwargs)
        return loss_weight(sigma, self.sigma_data) * masked_mse(denoised, x0, keep)
