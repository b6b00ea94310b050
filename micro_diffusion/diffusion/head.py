"""The per-token diffusion of Fluid's head: improved DDPM (Nichol & Dhariwal 2021) on one continuous token at a time.

A cosine beta schedule over 1000 steps; the head predicts epsilon and, per dimension, a value v in [-1, 1] that places
the reverse variance between the posterior variance (beta tilde) and beta in log space (the "learned range"). The
loss is the epsilon MSE plus the variational-bound term that trains v; sampling runs on a respaced schedule.

Notation: S schedule steps, M tokens (rows), d token dimension. `head(x (M, d), t (M,) original steps, c (M, cond))`
returns (M, 2d): epsilon, then v. Steps given to the head are always steps of the original 1000-step process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOG2 = math.log(2.0)
# Sampling bounds the head's x0 estimate to +-5: tokens are the latents over sigma_data (unit std), so a converged head
# never reaches it, but near t = T of the cosine schedule (abar_999 ~ 1e-8) x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
# multiplies an epsilon error by ~1e4, and the first reverse step passes it on amplified (1 / sqrt(alpha_t): 32 at
# 1000 steps, 174 at 100). MAR samples unclipped; a small head trained for minutes then makes tokens of 1e3 (measured:
# the demo's Fluid), which the bound prevents without changing what a precise head samples.
X0_BOUND = 5.0


def cosine_betas(steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: beta_t = 1 - abar((t+1)/S) / abar(t/S), abar(u) = cos((u+s)/(1+s) pi/2)^2."""
    def alpha_bar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = np.arange(steps + 1, dtype=np.float64) / steps  # (S+1,)
    return np.minimum(1.0 - alpha_bar(u[1:]) / alpha_bar(u[:-1]), max_beta)  # (S,), clipped near u = 1


def spaced_steps(steps: int, count: int) -> list[int]:
    """`count` evenly strided steps of 0..steps-1, both ends kept (the improved-DDPM respacing of one section)."""
    if not 1 <= count <= steps:
        raise ValueError(f"cannot take {count} steps out of {steps}")
    stride = (steps - 1) / (count - 1) if count > 1 else 1.0
    taken, position = [], 0.0
    for _ in range(count):  # a running sum rounded each time, as the reference respacing does
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


@dataclass
class HeadSchedule:
    """A (possibly respaced) diffusion process: its betas, and which original step each of its indices stands for."""

    betas: np.ndarray  # (S,) float64
    timestep_map: np.ndarray  # (S,) int64: index -> step of the original process (what the head is given)
    alphas_cumprod: np.ndarray = field(init=False)  # abar_t
    alphas_cumprod_prev: np.ndarray = field(init=False)  # abar_{t-1}, 1 at t = 0
    posterior_variance: np.ndarray = field(init=False)  # beta tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance_clipped: np.ndarray = field(init=False)  # log beta tilde, its 0 at t = 0 replaced by t = 1's
    posterior_mean_coef1: np.ndarray = field(init=False)  # of x0 in mu tilde(x_t, x0)
    posterior_mean_coef2: np.ndarray = field(init=False)  # of x_t in mu tilde(x_t, x0)

    def __post_init__(self) -> None:
        b = self.betas = np.asarray(self.betas, dtype=np.float64)
        self.timestep_map = np.asarray(self.timestep_map, dtype=np.int64)
        if b.ndim != 1 or self.timestep_map.shape != b.shape or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be one value in (0, 1] per step, with one original step per index")
        abar = self.alphas_cumprod = np.cumprod(1.0 - b)
        abar_prev = self.alphas_cumprod_prev = np.append(1.0, abar[:-1])
        self.posterior_variance = b * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar)

    @property
    def num_timesteps(self) -> int:
        """S, the number of steps of this process."""
        return len(self.betas)

    @classmethod
    def cosine(cls, steps: int = 1000) -> HeadSchedule:
        """The training process: the cosine schedule over `steps` steps, each index its own step."""
        return cls(cosine_betas(steps), np.arange(steps))

    def respaced(self, count: int) -> HeadSchedule:
        """`count` evenly spaced steps of this process, betas recomputed so that abar matches at the kept steps."""
        kept = spaced_steps(self.num_timesteps, count)
        abar = self.alphas_cumprod[kept]  # (count,)
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return HeadSchedule(betas, self.timestep_map[kept])


def _at(values: np.ndarray, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | float:
    """values[t] as a float32 column (M, 1) on like's device, or a plain number for one step shared by all rows."""
    if isinstance(t, int):
        return float(values[t])  # sampling: no host-to-device copy per step
    return torch.from_numpy(values).to(like.device)[t].float()[:, None]


def q_sample(schedule: HeadSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: a draw of q(x_t | x0) with the given noise; (M, d)."""
    abar = schedule.alphas_cumprod
    return _at(np.sqrt(abar), t, x0) * x0 + _at(np.sqrt(1.0 - abar), t, x0) * noise


def posterior(schedule: HeadSchedule, x0: torch.Tensor, x_t: torch.Tensor,
              t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Mean (M, d) and clipped log variance (M, 1) of q(x_{t-1} | x_t, x0); t per row (M,) or one step."""
    mean = _at(schedule.posterior_mean_coef1, t, x_t) * x0 + _at(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, _at(schedule.posterior_log_variance_clipped, t, x_t)


def reverse_step(schedule: HeadSchedule, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor,
                 v: torch.Tensor, clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance (both (M, d)) of p(x_{t-1} | x_t) from the head's epsilon and learned-range values v;
    `clip` bounds the x0 estimate to [-clip, clip] (sampling), None leaves it as is (the training bound)."""
    abar = schedule.alphas_cumprod
    x0 = _at(np.sqrt(1.0 / abar), t, x_t) * x_t - _at(np.sqrt(1.0 / abar - 1.0), t, x_t) * eps  # (M, d)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    mean, min_log = posterior(schedule, x0, x_t, t)
    max_log = _at(np.log(schedule.betas), t, x_t)
    frac = (v + 1) / 2  # v = -1: beta tilde, v = 1: beta
    return mean, frac * max_log + (1 - frac) * min_log


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation improved DDPM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) per element, in nats, for a Gaussian discretized to bins of width 2/255 on [-1, 1] (open edge bins)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_minus = _approx_std_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_below = torch.log(cdf_plus.clamp(min=1e-12))  # the bin reaching down to -inf
    log_above = torch.log((1.0 - cdf_minus).clamp(min=1e-12))  # the bin reaching up to +inf
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))


def vb_bits(schedule: HeadSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
    """The variational-bound term L_t per row, in bits per dimension: (M,).

    t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: the decoder's discretized-Gaussian NLL of x0.
    """
    true_mean, true_log_var = posterior(schedule, x0, x_t, t)
    mean, log_var = reverse_step(schedule, x_t, t, eps, v)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / LOG2  # (M,)
    nll = discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(dim=1) / LOG2  # (M,)
    return torch.where(t == 0, nll, kl)


def head_loss(head: Head, x0: torch.Tensor, c: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              schedule: HeadSchedule) -> torch.Tensor:
    """Improved DDPM's hybrid loss per row, (M,): ||eps - eps_theta||^2 (mean over d) + L_vb on v only."""
    x0, noise = x0.float(), noise.float()
    x_t = q_sample(schedule, x0, t, noise)  # (M, d)
    original_t = torch.from_numpy(schedule.timestep_map).to(t.device)[t]  # (M,)
    eps, v = head(x_t, original_t, c).float().chunk(2, dim=1)  # (M, d) each
    mse = ((noise - eps) ** 2).mean(dim=1)  # (M,)
    vb = vb_bits(schedule, x0, x_t, t, eps.detach(), v)  # (M,): the bound trains the variance, not the mean
    return mse + vb * (schedule.num_timesteps / 1000.0)  # the 1/1000 keeps the bound from outweighing the MSE


@torch.no_grad()
def head_sample(head: Head, c: torch.Tensor, noise: torch.Tensor, schedule: HeadSchedule, temperature: float = 1.0,
                guidance: torch.Tensor | None = None, null_c: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling of p(x_{t-1} | x_t) from x_T = noise[:, 0] down to x0: (M, d).

    noise (M, S+1, d) is drawn by the caller (step k of S uses noise[:, k], scaled by the temperature; the last
    step adds none). With guidance (M,), the head also runs on null_c at the same x_t and
    eps = eps_u + w (eps_c - eps_u); the variance stays the conditional one.
    """
    if (guidance is None) != (null_c is None):
        raise ValueError("guidance and null_c go together: give both or neither")
    steps, d = schedule.num_timesteps, noise.shape[2]
    if noise.shape[1] != steps + 1:
        raise ValueError(f"noise has {noise.shape[1]} draws per token, the schedule needs {steps + 1}")
    x = noise[:, 0].float()  # (M, d) = x_T
    M = x.shape[0]
    for k, index in enumerate(range(steps - 1, -1, -1), start=1):
        original_t = torch.full((M,), int(schedule.timestep_map[index]), dtype=torch.long, device=x.device)  # (M,)
        if guidance is None:
            eps, v = head(x, original_t, c).float().chunk(2, dim=1)  # (M, d) each
        else:
            out = head(torch.cat([x, x]), torch.cat([original_t, original_t]), torch.cat([c, null_c])).float()
            eps_c, v = out[:M].chunk(2, dim=1)  # (M, d) each
            eps_u = out[M:, :d]  # (M, d)
            eps = eps_u + guidance.float()[:, None] * (eps_c - eps_u)
        mean, log_var = reverse_step(schedule, x, index, eps, v, X0_BOUND)  # (M, d) each
        x = mean + temperature * torch.exp(0.5 * log_var) * noise[:, k].float() if index > 0 else mean  # x_{t-1}
    return x
