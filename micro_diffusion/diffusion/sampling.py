"""Samplers for the EDM probability-flow ODE/SDE, as plain functions sharing one signature, described by one table
(SAMPLERS: function, evaluations per step, options, noise, schedule), guidance, and the one function every caller
samples latents with (`generate_latents`).

Every sampler is called as `fn(denoiser, x, sigmas, generator, **options)`: `x` is the starting point already scaled to
sigmas[0], `sigmas` the decreasing noise levels with a trailing 0 (steps+1 values). The denoiser is called as
`denoiser(x, sigma)` with x (N, C, H, W) float32 and sigma a float32 tensor of shape (N,) (one level per sample, all
equal here), and returns D(x; sigma), the EDM denoised estimate, of the shape of x. `generator` is a
torch.Generator, or one per sample (image k's draws then do not depend on the other images of its batch).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import UsageError
from ..utils.seeds import derive_seed, draw, seeded_generator
from .edm import EDMPrecond
from .fluid import generate_fluid

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplingSettings:
    """How an image is sampled besides its caption and seed; the defaults are the released model's."""

    steps: int = 30  # noise levels (Heun spends 2*steps-1 network evaluations)
    guidance: float = 5.0  # classifier-free guidance scale; 1 turns guidance off
    sampler: str = "heun"
    guidance_interval: tuple[float, float] | None = None  # guide only for sigma in [lo, hi]
    temperature: float | None = None  # the fluid sampler: multiplies the noise of each step of its head
    head_steps: int | None = None  # the fluid sampler: reverse steps of its head per revealed token
    # "cfg": the unconditional branch is the full network on the null caption; "path_drop": SPRINT's Path-Drop
    # Guidance, the null caption through the network without its sparse middle (guided_denoiser)
    guidance_mode: str = "cfg"

    def __post_init__(self) -> None:
        reveal = self.sampler in SAMPLERS and SAMPLERS[self.sampler].schedule == "reveal"
        given = [k for k in FLUID_FIELDS if getattr(self, k) is not None]
        if given and self.sampler in SAMPLERS and not reveal:
            raise UsageError(f"{', '.join(given)}: settings of the fluid sampler; sampler {self.sampler!r} has none")
        if reveal and self.guidance_interval is not None:
            raise UsageError(f"guidance_interval: the {self.sampler} sampler raises guidance linearly over its steps "
                             "and takes no interval")
        if self.temperature is not None and not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.head_steps is not None and (isinstance(self.head_steps, bool) or not isinstance(self.head_steps, int)
                                            or not 1 <= self.head_steps <= 1000):
            raise UsageError(f"head_steps must be an integer in [1, 1000] (of the head's 1000), got {self.head_steps}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise UsageError(f"unknown guidance_mode {self.guidance_mode!r}; known: {', '.join(GUIDANCE_MODES)}")
        spec = SAMPLERS.get(self.sampler)
        if self.guidance_mode == "path_drop" and spec is not None and (spec.family != "dit" or spec.for_students):
            raise UsageError(f"guidance_mode path_drop guides the EDM samplers of SPRINT networks, not the "
                             f"{self.sampler} sampler: use guidance_mode cfg")

    def to_dict(self) -> dict:
        """Plain, JSON-ready copy; the fluid sampler's own fields only where they are set, guidance_mode only where it
        is not "cfg" (so records written before it stay as they were)."""
        return {k: v for k, v in asdict(self).items() if (v is not None or k not in FLUID_FIELDS)
                and (k != "guidance_mode" or v != "cfg")}


FLUID_FIELDS = ("temperature", "head_steps")  # settings only the fluid sampler reads
GUIDANCE_MODES = ("cfg", "path_drop")  # SamplingSettings.guidance_mode


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM (Karras et al. 2022, eq. 5) noise levels: `steps` levels from sigma_max to sigma_min, then 0: (steps+1,)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Evaluate D at one noise level, broadcast to the (N,) sigma tensor the denoiser contract promises."""
    return denoiser(x, sigma.expand(x.shape[0])).float()


def _randn_like(x: torch.Tensor, generator: Noise) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn on the generator's device (per sample for a list of generators)."""
    if isinstance(generator, Sequence):
        return torch.stack([draw("randn", x.shape[1:], g, x.device, x.dtype) for g in generator])
    return draw("randn", x.shape, generator, x.device, x.dtype)


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                 generator: Noise = None) -> torch.Tensor:
    """Euler's method on the EDM probability-flow ODE (= DDIM in sigma space); one evaluation per noise level."""
    for i in range(len(sigmas) - 1):
        d = (x - _call(denoiser, x, sigmas[i])) / sigmas[i]  # dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3)
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                generator: Noise = None) -> torch.Tensor:
    """EDM Algorithm 1: Heun's 2nd-order method on the probability-flow ODE; 2*steps-1 evaluations."""
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x = _heun_step(denoiser, x, t_cur, t_next)
    return x


def _heun_step(denoiser: Denoiser, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Lines 4-8 of EDM Algorithm 1 (lines 7-10 of Algorithm 2): an Euler step, then the trapezoidal correction."""
    d_cur = (x - _call(denoiser, x, t_cur)) / t_cur  # line 4: evaluate dx/dt at t_i
    x_next = x + (t_next - t_cur) * d_cur  # line 5: Euler step from t_i to t_{i+1}
    if t_next > 0:  # line 6: the correction is skipped on the last step, where sigma reaches 0
        d_next = (x_next - _call(denoiser, x_next, t_next)) / t_next  # line 7
        x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)  # line 8: trapezoidal rule
    return x_next


def sample_stochastic(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                      generator: Noise = None, *, S_churn: float, S_min: float, S_max: float,
                      S_noise: float) -> torch.Tensor:
    """EDM Algorithm 2: stochastic sampling (noise churn, then a Heun step); SAMPLERS holds the option defaults."""
    steps = len(sigmas) - 1
    for i in range(steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        # line 5: gamma_i, the amount of noise to add back, only inside [S_min, S_max]
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur  # line 6: raise the noise level
        eps = _randn_like(x, generator) * S_noise  # line 6: eps ~ N(0, S_noise^2 I)
        x_hat = x + (t_hat**2 - t_cur**2).clamp(min=0).sqrt() * eps  # line 7
        x = _heun_step(denoiser, x_hat, t_hat, t_next)  # lines 8-11: Heun step from t_hat to t_{i+1}
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                    generator: Noise = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in sigma space; one evaluation per noise level."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = _call(denoiser, x, sigmas[i])
        if sigmas[i + 1] == 0:  # the data-prediction update with sigma_{i+1} = 0 lands exactly on D
            return denoised
        lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()  # lambda = log(alpha/sigma) = -log sigma here
        h = lam_next - lam
        if old_denoised is None:  # first step: the 1st-order update (DPM-Solver++(1S) = DDIM)
            d = denoised
        else:  # multistep: extrapolate D linearly in lambda from the previous step (r = h_{i-1} / h_i)
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d  # exact integration of the linear part
        old_denoised, h_last = denoised, h
    return x


def sample_consistency(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                       generator: Noise = None) -> torch.Tensor:
    """Multistep consistency sampling (sCM): x_0 = f(x, sigma), re-noised to the next level, f applied again.

    For a distilled student D(x; sigma) is the consistency function f; one step maps sigma_max straight to data.
    """
    x0 = x
    for i in range(len(sigmas) - 1):
        x0 = _call(denoiser, x, sigmas[i])  # f(x_t, t) in EDM terms: the student's D(x; sigma)
        if sigmas[i + 1] > 0:  # re-noise the estimate to the next, lower level: x = x_0 + sigma n
            x = x0 + sigmas[i + 1] * _randn_like(x0, generator)
    return x0


# TrigFlow times of the intermediate levels of multistep consistency sampling; 1.1 is the sCM paper's 2-step choice.
CONSISTENCY_MID_TIMES: dict[int, tuple[float, ...]] = {1: (), 2: (1.1,), 4: (1.3, 1.1, 0.8)}


def consistency_sigmas(steps: int, sigma_max: float, sigma_data: float, mid_times: Sequence[float] | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """(sigma_max, sigma_d tan(t_1), ..., 0): the levels of `steps`-step consistency sampling, (steps+1,)."""
    if mid_times is None:
        if steps not in CONSISTENCY_MID_TIMES:
            raise ValueError(f"consistency sampling has default intermediate times for {sorted(CONSISTENCY_MID_TIMES)}"
                             f" steps; give mid_times (TrigFlow times in (0, pi/2)) for {steps}")
        mid_times = CONSISTENCY_MID_TIMES[steps]
    if len(mid_times) != steps - 1:
        raise ValueError(f"{steps} consistency steps need {steps - 1} intermediate times, got {list(mid_times)}")
    mids = [sigma_data * math.tan(t) for t in mid_times]
    levels = [sigma_max, *mids, 0.0]
    if any(a <= b for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"consistency levels must decrease from sigma_max, got {levels} "
                         f"(mid_times {list(mid_times)})")
    return torch.tensor(levels, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class Sampler:
    """Everything the project knows about one sampler: its function, cost, options and noise levels."""

    fn: Callable[..., torch.Tensor]  # fn(denoiser, x, sigmas, generator, **options)
    evaluations: Callable[[int], int]  # network evaluations per image for `steps` levels, without guidance
    options: Mapping[str, object] = field(default_factory=dict)  # the sampler's own options and their defaults
    stochastic: bool = False  # draws noise from the generator while it integrates
    schedule: str = "karras"  # "karras" (karras_sigmas), "consistency" (consistency_sigmas) or "reveal" (Fluid's)
    for_students: bool = False  # samples distilled consistency students, never a diffusion model
    family: str = "dit"  # the model family it samples (families.FAMILIES)

    def schedule_options(self) -> dict[str, object]:
        """Options of the noise levels (consistency: sigma_data, required, and mid_times), with their defaults."""
        return {"sigma_data": REQUIRED, "mid_times": None} if self.schedule == "consistency" else {}


class _Required:
    """The default of an option that has none: the caller must give it (e.g. the denoiser's sigma_data)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def _two_per_step(steps: int) -> int:
    """Heun-type samplers: two evaluations a level, the correction skipped on the last one (sigma reaches 0)."""
    return 2 * steps - 1


def _one_per_step(steps: int) -> int:
    """One evaluation a level."""
    return steps


# The one sampler table: name -> function, evaluation count, options, noise and schedule.
SAMPLERS: dict[str, Sampler] = {
    "heun": Sampler(sample_heun, _two_per_step),
    "euler": Sampler(sample_euler, _one_per_step),
    "ddim": Sampler(sample_euler, _one_per_step),  # DDIM's update in sigma space is Euler's (Karras et al. sec. 3)
    "stochastic": Sampler(sample_stochastic, _two_per_step, stochastic=True,  # EDM's ImageNet-64 settings
                          options={"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, _one_per_step),
    "consistency": Sampler(sample_consistency, _one_per_step, stochastic=True, schedule="consistency",
                           for_students=True),
    # Fluid: `steps` transformer passes revealing tokens (diffusion.fluid.generate_fluid), not noise levels
    "fluid": Sampler(generate_fluid, _one_per_step, stochastic=True, schedule="reveal", family="fluid"),
}

DEFAULTS = SamplingSettings()  # the one source of the MicroDiT sampling defaults (CLI, recipes, callbacks, FLOPs)
# Fluid's (Fan et al. 2024, random order): 64 transformer passes, 100 head steps, temperature 0.975, guidance 5 on
# the linear schedule.
FLUID_DEFAULTS = SamplingSettings(steps=64, guidance=5.0, sampler="fluid", temperature=0.975, head_steps=100)


def sampler_spec(sampler: str) -> Sampler:
    """The table entry of a sampler; an unknown name is an error listing the known ones."""
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[sampler]


def diffusion_samplers(family: str = "dit") -> list[str]:
    """The samplers of a family's diffusion models (every one of the family's but the distilled students'), sorted."""
    return sorted(name for name, spec in SAMPLERS.items() if not spec.for_students and spec.family == family)


def network_evals(steps: int, sampler: str = DEFAULTS.sampler) -> int:
    """Network evaluations one image costs with `sampler` over `steps` noise levels, without guidance."""
    spec = sampler_spec(sampler)
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    return spec.evaluations(steps)


def sampler_options(sampler: str) -> dict[str, object]:
    """The extra options a sampler accepts, with their defaults (REQUIRED where the caller must give one)."""
    spec = sampler_spec(sampler)
    return {**spec.options, **spec.schedule_options()}


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, steps: int = DEFAULTS.steps, sampler: str = DEFAULTS.sampler,
           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, generator: Noise = None,
           **options) -> torch.Tensor:
    """Integrate from standard-normal `noise` (N, C, H, W) to a sample x0 (float32) over `steps` noise levels.

    steps counts noise levels (Karras schedule), not network evaluations: Heun and the stochastic sampler spend
    2*steps-1 evaluations, Euler/DDIM, DPM-Solver++(2M) and consistency sampling spend `steps`. `generator` seeds
    the noise of the stochastic and the consistency samplers (the deterministic ones draw nothing). `options` go to
    the sampler (e.g. S_churn for "stochastic"; sigma_data and mid_times for the consistency levels).
    """
    spec, known = sampler_spec(sampler), sampler_options(sampler)
    if spec.schedule == "reveal":
        raise ValueError(f"sampler {sampler!r} samples Fluid models (generate_fluid), not the EDM ODE")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"sampler {sampler!r} has no option(s) {unknown}; it accepts {sorted(known) or 'none'}")
    missing = sorted(k for k, v in known.items() if v is REQUIRED and k not in options)
    if missing:
        raise ValueError(f"sampler {sampler!r} needs the option(s) {missing} (e.g. the denoiser's sigma_data)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    levels = {k: options.pop(k) for k in spec.schedule_options() if k in options}
    if spec.schedule == "consistency":  # sigma_max, the intermediate levels, 0
        sigmas = consistency_sigmas(steps, sigma_max, device=noise.device, **levels)
    else:
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device)  # (steps+1,)
    x = noise.float() * sigmas[0]  # x_0 ~ N(0, sigma_max^2 I)
    return spec.fn(denoiser, x, sigmas, generator, **{**spec.options, **options})


def cfg_denoiser(denoiser_cond: Denoiser, denoiser_uncond: Denoiser, scale: float,
                 interval: tuple[float, float] | None = None) -> Denoiser:
    """Classifier-free guidance: D = D_u + scale (D_c - D_u), applied only where interval[0] <= sigma <= interval[1].

    Outside the interval the conditional denoiser alone is used (and the unconditional branch is not evaluated).
    """
    if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
        raise ValueError(f"guidance interval must be (sigma_lo, sigma_hi) with lo <= hi, got {interval}")

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_cond = denoiser_cond(x, sigma)
        inside = torch.ones_like(sigma, dtype=torch.bool) if interval is None else \
            (sigma >= interval[0]) & (sigma <= interval[1])  # (N,)
        if not bool(inside.any()):
            return d_cond
        d_uncond = denoiser_uncond(x, sigma)
        d_guided = d_uncond + scale * (d_cond - d_uncond)
        return torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), d_guided, d_cond)

    return guided


def conditioned(denoiser: EDMPrecond, cond: torch.Tensor) -> Denoiser:
    """The sampler's (x, sigma) -> D view of an EDM denoiser with its conditioning (N, L, D) fixed."""
    return lambda x, sigma: denoiser(x, sigma, cond)


def guided_denoiser(denoiser: EDMPrecond, cond: torch.Tensor, null_caption: torch.Tensor | np.ndarray, scale: float,
                    interval: tuple[float, float] | None = None, path_drop: bool = False) -> Denoiser:
    """CFG over an EDM denoiser; the unconditional branch uses the null caption (L, D) caption dropout trains on.

    `path_drop`: Path-Drop Guidance (SPRINT, Park et al. 2025) for SPRINT networks. As SPRINT's sampler does, the
    unconditional branch takes the null caption and also skips the sparse middle blocks: the encoder runs, the
    middle's output is the fixed fill token at every position, then the fusion and the decoder run
    (MicroDiT's drop_path). The conditional branch is the full network. SPRINT also trains for this branch (its
    cfg_mask_prob: 10% of training samples see the fill token in place of the middle's output); training here does not.
    """
    null = torch.as_tensor(np.asarray(null_caption, dtype=np.float32) if isinstance(null_caption, np.ndarray)
                           else null_caption).to(cond.device, cond.dtype)
    if null.shape != cond.shape[1:]:
        raise ValueError(f"null caption shape {tuple(null.shape)} does not match caption tokens "
                         f"{tuple(cond.shape[1:])}")
    if scale == 1.0:  # D_u + 1 (D_c - D_u) = D_c: skip the unconditional evaluations
        return conditioned(denoiser, cond)
    uncond = null.unsqueeze(0).expand_as(cond)  # (N, L, D)
    d_uncond = (lambda x, sigma: denoiser(x, sigma, uncond, drop_path=True)) if path_drop else \
        conditioned(denoiser, uncond)
    return cfg_denoiser(conditioned(denoiser, cond), d_uncond, scale, interval)


def image_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """Per-image seeds of a run seeded `seed`: image k's seed depends on (seed, k) alone, never on its batch."""
    return [derive_seed(seed, int(k)) for k in indices]


@torch.no_grad()
def generate_latents(denoiser: EDMPrecond, cond: torch.Tensor, null_caption: torch.Tensor | np.ndarray,
                     settings: SamplingSettings, seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Latents (N, C, H, W) for caption embeddings cond (N, L, D): the one sampling path of the project.

    Image k starts from noise drawn on the CPU from seeds[k] (the same on any device) and draws its stochastic-sampler
    noise from a generator of its own, so it is reproduced from its seed in any batch, on any caller. The caller
    chooses the weights, the train/eval mode of the network and the precision (autocast) around this call.
    """
    if len(seeds) != cond.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {cond.shape[0]} caption embeddings")
    noise = torch.stack([torch.randn(shape, generator=seeded_generator(s)) for s in seeds])  # (N, C, H, W)
    stochastic = sampler_spec(settings.sampler).stochastic  # the deterministic samplers draw nothing
    churn = [seeded_generator(derive_seed(s, 1)) for s in seeds] if stochastic else None
    guided = guided_denoiser(denoiser, cond, null_caption, settings.guidance, settings.guidance_interval,
                             path_drop=settings.guidance_mode == "path_drop")
    levels = {"sigma_data": denoiser.sigma_data} if "sigma_data" in sampler_options(settings.sampler) else {}
    return sample(guided, noise.to(cond.device), steps=settings.steps, sampler=settings.sampler, generator=churn,
                  **levels)
