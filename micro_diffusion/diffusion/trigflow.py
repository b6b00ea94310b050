"""TrigFlow and continuous-time consistency distillation (sCD; Lu & Song 2024, arXiv 2410.11081) in EDM terms.

TrigFlow: x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_d^2 I), t in [0, pi/2]. It is the EDM family with
sigma = sigma_d tan(t) and x_sigma = x_t / cos(t); under EDM's preconditioning c_in x_sigma = x_t / sigma_d,
c_skip = cos^2(t) and c_out = sigma_d sin(t), so an EDM network F_net already is a TrigFlow network:
    F(x_t / sigma_d, t) = -F_net(x_t / sigma_d; c_noise(sigma_d tan t)),
    consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F = D(x_t / cos t; sigma_d tan t),
    probability-flow ODE dx_t/dt = sigma_d F(x_t / sigma_d, t).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.func import jvp

from ..utils.seeds import draw
from .edm import EDMPrecond, c_noise, per_sample

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> dx_t/dt


def edm_sigma(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM noise level of TrigFlow time t: sigma_d tan(t)."""
    return sigma_data * torch.tan(t)


def trigflow_time(sigma: torch.Tensor | float, sigma_data: float) -> torch.Tensor:
    """TrigFlow time of an EDM noise level: arctan(sigma / sigma_d)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64) / sigma_data).float()


def trigflow_F(denoiser: EDMPrecond, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """F(x_t / sigma_d, t) of an EDM-preconditioned network: -F_net(x_in; c_noise(sigma_d tan t)), at least fp32."""
    sigma = edm_sigma(t, denoiser.sigma_data)  # (N,)
    out = denoiser.net(x_in, c_noise(sigma), cond).sample
    return -out.to(torch.promote_types(out.dtype, torch.float32))


def consistency_fn(denoiser: EDMPrecond, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t): the network's estimate of x_0."""
    sd = denoiser.sigma_data
    return per_sample(t.cos()) * x_t - per_sample(t.sin()) * sd * trigflow_F(denoiser, x_t / sd, t, cond)


def guided_velocity(teacher: EDMPrecond, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> Velocity:
    """dx_t/dt = sigma_d F of a teacher with classifier-free guidance at a fixed scale (F is linear in D)."""
    sd = teacher.sigma_data

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f_cond = trigflow_F(teacher, x_t / sd, t, cond)
        if scale == 1.0:
            return sd * f_cond
        f_uncond = trigflow_F(teacher, x_t / sd, t, uncond)
        return sd * (f_uncond + scale * (f_cond - f_uncond))

    return velocity


def training_times(n: int, p_mean: float, p_std: float, sigma_data: float, sigma_max: float,
                   device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t = arctan(exp(tau) / sigma_d) with tau ~ N(P_mean, P_std^2), clamped to arctan(sigma_max / sigma_d): (n,)."""
    tau = draw("randn", (n,), generator, device) * p_std + p_mean
    return torch.atan(tau.exp() / sigma_data).clamp(max=math.atan(sigma_max / sigma_data))


def student_jvp(student: EDMPrecond, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                dxdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F_minus and cos(t) sin(t) dF_minus/dt along the teacher's ODE, by one forward-mode JVP, gradients stopped.

    The tangents (cos t sin t dx_t/dt / sigma_d, cos t sin t) of the inputs (x_t / sigma_d, t) give the scaled time
    derivative directly, and keep the derivative of c_noise = ln(sigma_d tan t) / 4 bounded (it is 1/4 then).
    Attention runs as plain products: fused attention kernels have no forward-mode derivative.
    """
    sd, cs = student.sigma_data, t.cos() * t.sin()  # (N,)

    def F(x_in: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return trigflow_F(student, x_in, tt, cond)

    with torch.no_grad():
        return jvp(F, (x_t / sd, t), (per_sample(cs) * dxdt / sd, cs))


def normalised_tangent(F_minus: torch.Tensor, dxdt: torch.Tensor, x_t: torch.Tensor, dF_scaled: torch.Tensor,
                       t: torch.Tensor, sigma_data: float, r: float) -> torch.Tensor:
    """g = -cos^2(t) (sigma_d F_minus - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_minus/dt), then g / (||g|| + 0.1).

    dF_scaled is cos(t) sin(t) dF_minus/dt (student_jvp's output); r rises from 0 to 1 over the tangent warmup.
    """
    cos, sin = per_sample(t.cos()), per_sample(t.sin())
    g = -cos**2 * (sigma_data * F_minus - dxdt) - r * (cos * sin * x_t + sigma_data * dF_scaled)
    norm = g.flatten(1).norm(dim=1)  # (N,): one norm per sample
    return g / per_sample(norm + 0.1)


class AdaptiveWeight(nn.Module):
    """The learned loss weighting w(t) of sCM: sinusoidal features of c_noise(t), then a small MLP -> (N,)."""

    def __init__(self, sigma_data: float, features: int = 32, hidden: int = 64):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer("freqs", torch.exp(-math.log(100.0) * torch.arange(features // 2) / (features // 2)))
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)  # w = 0 at the start: the plain squared error
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = c_noise(edm_sigma(t, self.sigma_data)).float()[:, None] * self.freqs[None] * 2 * math.pi  # (N, F/2)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1)).squeeze(-1)  # (N,)


def scd_loss(student: EDMPrecond, velocity: Velocity, weight: nn.Module, x0: torch.Tensor, cond: torch.Tensor,
             p_mean: float, p_std: float, sigma_max: float, r: float,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The sCD loss e^{w(t)} / D ||F_theta - F_minus - g||^2 - w(t), averaged over the batch, and its parts.

    velocity is the (guided) teacher's dx_t/dt; the student's F_minus and its time derivative come from one JVP with
    gradients stopped, so only the last student forward is differentiated.
    """
    sd = student.sigma_data
    t = training_times(x0.shape[0], p_mean, p_std, sd, sigma_max, x0.device, generator)  # (N,)
    z = draw("randn", x0.shape, generator, x0.device, x0.dtype) * sd
    x_t = per_sample(t.cos()) * x0 + per_sample(t.sin()) * z  # (N, C, H, W)
    with torch.no_grad():
        dxdt = velocity(x_t, t)
    F_minus, dF_scaled = student_jvp(student, x_t, t, cond, dxdt)
    g = normalised_tangent(F_minus, dxdt, x_t, dF_scaled, t, sd, r)
    F_theta = trigflow_F(student, x_t / sd, t, cond)
    w = weight(t)  # (N,)
    err = ((F_theta - F_minus - g) ** 2).flatten(1).sum(dim=1) / x0[0].numel()  # (N,)
    loss = (w.exp() * err - w).mean()
    return loss, {"t": t, "error": err.detach(), "weight": w.detach()}
