"""Samplers on a known answer (Gaussian data with its ideal denoiser), guidance math, seeding and errors."""
import math

import numpy as np
import pytest
import torch

from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import (
    SAMPLERS,
    SamplingSettings,
    cfg_denoiser,
    generate_latents,
    guided_denoiser,
    image_seeds,
    karras_sigmas,
    network_evals,
    sample,
    sampler_options,
)
from micro_diffusion.models import create_dit

MU, S = 0.7, 1.0  # data ~ N(MU, S^2 I)


def ideal_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for Gaussian data: mu + s^2 / (s^2 + sigma^2) (x - mu); sigma is (N,)."""
    assert sigma.shape == (x.shape[0],)
    w = (S**2 / (S**2 + sigma**2)).reshape(-1, 1, 1, 1)
    return MU + w * (x - MU)


class Counting:
    """Wraps a denoiser and counts its evaluations."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def exact_ode_end(noise: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
    """The exact probability-flow ODE map from x(sigma_max) = sigma_max n to sigma = 0 for Gaussian data."""
    return MU + S / math.sqrt(S**2 + sigma_max**2) * (noise * sigma_max - MU)


def noise(n=4000, seed=0):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_karras_schedule_endpoints_and_order():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.shape == (11,) and s[-1] == 0
    assert math.isclose(s[0].item(), 80.0, rel_tol=1e-6) and math.isclose(s[-2].item(), 0.002, rel_tol=1e-4)
    assert bool((s[:-1] > s[1:]).all())


# First-order Euler/DDIM keep an O(1/steps) bias at 30 steps (std about 8% low here); the 2nd-order ones about 2%.
@pytest.mark.parametrize("name,std_tol", [("heun", 0.03), ("dpmpp_2m", 0.03), ("euler", 0.1), ("ddim", 0.1)])
def test_deterministic_samplers_recover_gaussian(name, std_tol):
    out = sample(ideal_denoiser, noise(), sampler=name)  # default 30 steps
    assert abs(out.mean().item() - MU) < 0.03, out.mean()
    assert abs(out.std().item() / S - 1) < std_tol, out.std()


def test_evaluation_counts_follow_steps():
    for name, steps, evals in [("heun", 7, 2 * 7 - 1), ("euler", 7, 7), ("ddim", 7, 7), ("dpmpp_2m", 7, 7),
                               ("stochastic", 7, 13), ("consistency", 4, 4)]:
        d = Counting(ideal_denoiser)
        levels = {"sigma_data": 0.9} if name == "consistency" else {}  # its levels need the denoiser's sigma_data
        sample(d, noise(8), steps=steps, sampler=name, **levels)
        assert d.calls == evals == network_evals(steps, name), name
    # each counted above; fluid's passes are counted in tests/test_fluid_math.py (decode calls per step)
    assert set(SAMPLERS) == {"heun", "euler", "ddim", "dpmpp_2m", "stochastic", "consistency", "fluid"}
    assert network_evals(16, "fluid") == 16
    with pytest.raises(ValueError, match="samples Fluid models"):
        sample(Counting(ideal_denoiser), noise(8), steps=4, sampler="fluid")


def test_heun_beats_euler_at_equal_evaluations():
    n = noise(512)
    target = exact_ode_end(n)
    heun = sample(ideal_denoiser, n, steps=30, sampler="heun")  # 59 evaluations
    euler = sample(ideal_denoiser, n, steps=59, sampler="euler")  # 59 evaluations
    err_heun, err_euler = ((heun - target) ** 2).mean().sqrt().item(), ((euler - target) ** 2).mean().sqrt().item()
    assert err_heun < 0.5 * err_euler, (err_heun, err_euler)


def test_ddim_is_euler():
    n = noise(64)
    assert torch.equal(sample(ideal_denoiser, n, steps=9, sampler="ddim"), sample(ideal_denoiser, n, steps=9,
                                                                                  sampler="euler"))


def test_stochastic_sampler_recovers_gaussian_and_is_seeded():
    n = noise()
    a = sample(ideal_denoiser, n, steps=30, sampler="stochastic", generator=torch.Generator().manual_seed(1))
    b = sample(ideal_denoiser, n, steps=30, sampler="stochastic", generator=torch.Generator().manual_seed(1))
    c = sample(ideal_denoiser, n, steps=30, sampler="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item() - MU) < 0.05 and abs(a.std().item() - S) < 0.06
    # churn really changes the trajectory: the result differs from the deterministic Heun map of the same noise
    assert (a - sample(ideal_denoiser, n, sampler="heun")).abs().mean().item() > 0.01
    no_churn = sample(ideal_denoiser, n, steps=30, sampler="stochastic", S_churn=0.0)
    assert torch.allclose(no_churn, sample(ideal_denoiser, n, steps=30, sampler="heun"), atol=1e-5)


def test_unknown_sampler_and_options_raise_naming_them():
    with pytest.raises(ValueError, match="bogus"):
        sample(ideal_denoiser, noise(4), sampler="bogus")
    with pytest.raises(ValueError, match="S_churn"):
        sample(ideal_denoiser, noise(4), sampler="heun", S_churn=10.0)
    with pytest.raises(ValueError, match="S_chrun"):
        sample(ideal_denoiser, noise(4), sampler="stochastic", S_chrun=10.0)
    assert set(sampler_options("stochastic")) == {"S_churn", "S_min", "S_max", "S_noise"}
    with pytest.raises(ValueError, match="sigma_data"):  # no silent default: the denoiser's value must be given
        sample(ideal_denoiser, noise(4), steps=2, sampler="consistency")


def test_cfg_math_and_interval():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = Counting(lambda x, s: x * 2.0)
    uncond = Counting(lambda x, s: x * 0.5)
    g = cfg_denoiser(cond, uncond, scale=3.0)
    sig = torch.full((3,), 1.0)
    assert torch.allclose(g(x, sig), x * 0.5 + 3.0 * (x * 2.0 - x * 0.5))
    gi = cfg_denoiser(cond, uncond, scale=3.0, interval=(0.5, 2.0))
    calls = uncond.calls
    assert torch.allclose(gi(x, torch.full((3,), 5.0)), x * 2.0)  # outside: conditional alone
    assert uncond.calls == calls  # the unconditional branch was not evaluated
    mixed = gi(x, torch.tensor([0.1, 1.0, 5.0]))  # per-sample sigma: only the middle one inside
    assert torch.allclose(mixed[0], x[0] * 2.0) and torch.allclose(mixed[2], x[2] * 2.0)
    assert torch.allclose(mixed[1], x[1] * 5.0)
    with pytest.raises(ValueError, match="interval"):
        cfg_denoiser(cond, uncond, 2.0, interval=(2.0, 1.0))


def tiny_denoiser() -> EDMPrecond:
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=32, width=64, depth=2, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=64).eval()
    for p in net.parameters():  # zero-init output layers give D = c_skip x; perturb so captions matter
        p.data.add_(0.05 * torch.randn_like(p))
    return EDMPrecond(net, sigma_data=0.9)


def test_guided_net_sampling_is_seeded_and_uses_null_caption():
    denoiser = tiny_denoiser()
    caps = torch.randn(2, 5, 32)
    null = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float16)
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    d = guided_denoiser(denoiser, caps, null, scale=4.0)
    a, b = sample(d, n, steps=3), sample(d, n, steps=3)
    assert a.shape == n.shape and torch.equal(a, b)
    other_null = guided_denoiser(denoiser, caps, null * 0, scale=4.0)
    assert not torch.allclose(a, sample(other_null, n, steps=3))
    with pytest.raises(ValueError, match="null caption shape"):
        guided_denoiser(denoiser, caps, null[:4], scale=4.0)


@pytest.mark.parametrize("sampler", ["heun", "stochastic"])
def test_image_k_depends_on_its_seed_alone_not_on_its_batch(sampler):
    denoiser, settings = tiny_denoiser(), SamplingSettings(steps=3, guidance=3.0, sampler=sampler)
    caps, null = torch.randn(4, 5, 32), torch.zeros(5, 32)
    whole = generate_latents(denoiser, caps, null, settings, image_seeds(7, range(4)), (4, 8, 8))
    tail = generate_latents(denoiser, caps[2:], null, settings, image_seeds(7, [2, 3]), (4, 8, 8))
    # images 2 and 3 again, in a batch of their own: equal up to fp32 rounding of differently blocked products
    assert (whole[2:] - tail).abs().max() <= 1e-4 * whole.abs().max()
    other = generate_latents(denoiser, caps, null, settings, image_seeds(8, range(4)), (4, 8, 8))
    assert not torch.allclose(whole, other)
    assert len(set(image_seeds(7, range(100)))) == 100 and image_seeds(7, [5]) == image_seeds(7, range(6))[5:]
    with pytest.raises(ValueError, match="3 seeds for 4"):
        generate_latents(denoiser, caps, null, settings, image_seeds(7, range(3)), (4, 8, 8))
