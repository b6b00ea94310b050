"""Consistency distillation: EDM-TrigFlow identity, the JVP, the tangent and loss, the consistency sampler, FLOPs."""
import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.cost.flops import distill_flops_per_sample, forward_flops, jvp_flops
from micro_diffusion.diffusion import edm
from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import consistency_sigmas, sample
from micro_diffusion.diffusion.trigflow import (
    AdaptiveWeight,
    consistency_fn,
    edm_sigma,
    guided_velocity,
    normalised_tangent,
    scd_loss,
    student_jvp,
    trigflow_F,
    trigflow_time,
)
from micro_diffusion.models import create_dit
from micro_diffusion.models.attention import plain_attention
from micro_diffusion.models.ffn import ExpertChoiceMoE

SD = 0.9


def tiny(moe_every: int = 2, dtype=torch.float32, seed: int = 0) -> EDMPrecond:
    """A tiny MicroDiT (MoE in backbone block 1 and mixer block 1 when moe_every=2), weights moved off init."""
    torch.manual_seed(seed)
    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=16, width=32, depth=3, head_dim=16,
                     patch_mixer_depth=2, patch_mixer_width=32, moe_every=moe_every).to(dtype)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return EDMPrecond(net.eval(), SD)


def test_an_edm_network_is_a_trigflow_network():
    d = tiny()
    g = torch.Generator().manual_seed(0)
    x_t, cond, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 16, generator=g), torch.tensor([.2, .9, 1.5])
    sigma = edm_sigma(t, SD)
    assert torch.allclose(trigflow_time(sigma, SD), t, atol=1e-6)
    # the preconditioning seen from TrigFlow: c_in x_sigma = x_t / sigma_d, c_skip = cos^2 t, c_out = sigma_d sin t
    x_sigma = x_t / t.cos().reshape(-1, 1, 1, 1)
    assert torch.allclose(edm.c_in(sigma, SD).reshape(-1, 1, 1, 1) * x_sigma, x_t / SD, atol=1e-5)
    assert torch.allclose(edm.c_skip(sigma, SD), t.cos() ** 2, atol=1e-6)
    assert torch.allclose(edm.c_out(sigma, SD), SD * t.sin(), atol=1e-6)
    # so the consistency function f = cos t x_t - sin t sigma_d F is the EDM denoiser D(x_t / cos t; sigma_d tan t)
    with torch.no_grad():
        assert torch.allclose(consistency_fn(d, x_t, t, cond), d(x_sigma, sigma, cond), atol=1e-5)


def test_guided_velocity_is_the_cfg_of_the_teacher():
    d = tiny()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 1.2])
    cond, uncond = torch.randn(2, 5, 16), torch.zeros(2, 5, 16)
    with torch.no_grad():
        fc, fu = trigflow_F(d, x / SD, t, cond), trigflow_F(d, x / SD, t, uncond)
        assert torch.allclose(guided_velocity(d, cond, uncond, 3.0)(x, t), SD * (fu + 3.0 * (fc - fu)), atol=1e-5)
        assert torch.allclose(guided_velocity(d, cond, uncond, 1.0)(x, t), SD * fc)


def _routes(d: EDMPrecond) -> list[torch.Tensor]:
    """Records which tokens every MoE layer routes, call by call."""
    seen = []
    for m in d.net.modules():
        if isinstance(m, ExpertChoiceMoE):
            m.register_forward_hook(lambda mod, inp, out: seen.append(mod.route(inp[0])[1].clone()))
    return seen


@pytest.mark.parametrize("moe_every", [0, 2])
@pytest.mark.slow
def test_jvp_matches_a_central_finite_difference(moe_every):
    d = tiny(moe_every, torch.float64)
    assert any(isinstance(m, ExpertChoiceMoE) for m in d.net.modules()) == bool(moe_every)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    t, v = torch.tensor([0.5, 1.1], dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    F_minus, dF = student_jvp(d, x_t, t, cond, v)
    assert torch.allclose(F_minus, trigflow_F(d, x_t / SD, t, cond).double(), atol=1e-6)
    cs = t.cos() * t.sin()
    routes = _routes(d)

    def along(eps: float) -> torch.Tensor:  # F at the inputs moved by eps along the JVP's tangents
        with torch.no_grad():
            return trigflow_F(d, (x_t + eps * cs.reshape(-1, 1, 1, 1) * v) / SD, t + eps * cs, cond).double()

    eps = 1e-4
    fd = [(along(h) - along(-h)) / (2 * h) for h in (eps, eps / 2)]
    richardson = (4 * fd[1] - fd[0]) / 3  # cancels the O(eps^2) term of the central difference
    if moe_every:  # a step small enough that no token changes expert: the derivative is defined there
        layers = sum(isinstance(m, ExpertChoiceMoE) for m in d.net.modules())
        assert len(routes) == 4 * layers  # four forwards: +eps, -eps, +eps/2, -eps/2
        assert all(torch.equal(routes[i], routes[k * layers + i]) for k in range(1, 4) for i in range(layers))
    assert (dF - richardson).abs().max() <= 1e-6 * dF.abs().max(), (dF - richardson).abs().max()
    assert dF.abs().max() > 1e-2  # the derivative is not trivially zero


def test_tangent_and_its_normalisation_on_hand_made_tensors():
    t = torch.tensor([math.pi / 4, math.pi / 3])
    F_minus, dxdt = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    x_t, dF_scaled = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)
    cos, sin = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    for r in (0.0, 0.5, 1.0):
        raw = -cos**2 * (SD * 1.0 - 2.0) - r * (cos * sin * 0.5 + SD * -1.0)  # (2, 1, 1, 1), the same per element
        want = raw / (raw.abs() * 2 + 0.1)  # 4 equal elements: the norm is 2 |element|
        got = normalised_tangent(F_minus, dxdt, x_t, dF_scaled, t, SD, r)
        assert torch.allclose(got, want.expand_as(got), atol=1e-6)
        assert (got.flatten(1).norm(dim=1) < 1).all()
    huge = normalised_tangent(F_minus * 1e6, dxdt, x_t, dF_scaled, t, SD, 1.0)
    assert torch.allclose(huge.flatten(1).norm(dim=1), torch.ones(2), atol=1e-6)  # large tangents: unit norm


def test_tangent_vanishes_at_the_exact_consistency_function_and_is_cos_t_df_dt_elsewhere():
    """Gaussian data N(MU, S^2): the teacher's exact velocity, its exact flow map f*, and a wrong student (D)."""
    mu, s, sd = 0.7, 1.0, SD
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 1.3 + 0.1
    x_t = torch.randn(64, 1, 2, 2, generator=gen, dtype=torch.float64) * 1.5
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731

    def sigma(tt): return sd * torch.tan(tt)
    def posterior(x, tt): return mu + s**2 / (s**2 + col(sigma(tt)) ** 2) * (x / col(tt.cos()) - mu)  # D(x_sigma)
    def flow(x, tt): return mu + s / (s**2 + col(sigma(tt)) ** 2).sqrt() * (x / col(tt.cos()) - mu)  # f*

    def F_of(f):  # F of a consistency function: f = cos t x_t - sin t sigma_d F
        return lambda x_in, tt: (col(tt.cos()) * x_in * sd - f(x_in * sd, tt)) / (sd * col(tt.sin()))

    velocity = sd * F_of(posterior)(x_t / sd, t)  # the teacher's dx_t/dt
    cs = t.cos() * t.sin()
    for f, exact in ((flow, True), (posterior, False)):
        F_minus, dF = torch.func.jvp(F_of(f), (x_t / sd, t), (col(cs) * velocity / sd, cs))
        cos, sin = col(t.cos()), col(t.sin())
        raw = -cos**2 * (sd * F_minus - velocity) - (cos * sin * x_t + sd * dF)
        if exact:
            assert raw.abs().max() < 1e-9  # f* is constant along the teacher's ODE: no tangent
        else:  # raw = cos(t) df/dt along the ODE, by a central difference of f along x_t' = dx_t/dt
            h = 1e-5
            fd = (f(x_t + h * velocity, t + h) - f(x_t - h * velocity, t - h)) / (2 * h)
            assert raw.abs().max() > 1e-2 and torch.allclose(raw, cos * fd, atol=1e-6)
        g = normalised_tangent(F_minus, velocity, x_t, dF, t, sd, 1.0)
        assert torch.allclose(g, raw / col(raw.flatten(1).norm(dim=1) + 0.1))


class Fixed(torch.nn.Module):
    """A loss weighting w(t) = c."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, t):
        return torch.full_like(t, self.c)


def test_loss_is_the_weighted_squared_tangent_at_the_fixed_point():
    d, x0, cond = tiny(0), torch.randn(4, 4, 8, 8), torch.randn(4, 5, 16)

    def zero_velocity(x, t):  # a teacher standing still: dx/dt = 0
        return torch.zeros_like(x)

    with plain_attention():
        loss, parts = scd_loss(d, zero_velocity, Fixed(0.7), x0, cond, -0.8, 1.6, 80.0, 1.0,
                               torch.Generator().manual_seed(3))
        t = parts["t"]
        gen = torch.Generator().manual_seed(3)  # redraw what scd_loss drew: t, then z
        tau = torch.randn(4, generator=gen) * 1.6 - 0.8
        assert torch.allclose(t, torch.atan(tau.exp() / SD).clamp(max=math.atan(80 / SD)))
        z = torch.randn(x0.shape, generator=gen) * SD
        x_t = t.cos().reshape(-1, 1, 1, 1) * x0 + t.sin().reshape(-1, 1, 1, 1) * z
        F_minus, dF = student_jvp(d, x_t, t, cond, torch.zeros_like(x_t))
        g = normalised_tangent(F_minus, torch.zeros_like(x_t), x_t, dF, t, SD, 1.0)
    # F_theta = F_minus at the current weights: the error is ||g||^2 / D, weighted by e^0.7, minus 0.7
    want = (math.exp(0.7) * (g**2).flatten(1).sum(1) / x0[0].numel() - 0.7).mean()
    assert torch.allclose(loss, want, atol=1e-5) and torch.allclose(parts["error"], (g**2).flatten(1).mean(1))


@pytest.mark.slow
def test_loss_reaches_the_student_and_the_weighting_only():
    student, teacher = tiny(2), tiny(2, seed=1)
    weight = AdaptiveWeight(SD)
    velocity = guided_velocity(teacher, torch.randn(2, 5, 16), torch.zeros(2, 5, 16), 2.0)
    with plain_attention():
        loss, _ = scd_loss(student, velocity, weight, torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), -0.8, 1.6,
                           80.0, 0.5, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in weight.parameters()) and student.net.final.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.net.parameters())


MU, S = 0.7, 1.0  # Gaussian data N(MU, S^2 I)


def exact_consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact consistency function of Gaussian data: the probability-flow ODE's map from sigma to 0."""
    return MU + S / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt() * (x - MU)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_recovers_gaussian_data(steps):
    noise = torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample(exact_consistency, noise, steps=steps, sampler="consistency", sigma_data=SD,
                 generator=torch.Generator().manual_seed(1))
    # one step from sigma_max misses the data mean by MU * S / sigma_max (the start ignores the data); more steps
    # re-noise and land on it
    assert abs(out.mean().item() - MU) < (0.012 if steps == 1 else 0.01) and abs(out.std().item() - S) < 0.01
    levels = consistency_sigmas(steps, 80.0, SD)
    assert levels[0] == 80.0 and levels[-1] == 0 and len(levels) == steps + 1
    if steps == 2:
        assert math.isclose(levels[1].item(), SD * math.tan(1.1), rel_tol=1e-6)


def test_consistency_levels_and_bad_steps_are_named():
    with pytest.raises(ValueError, match="default intermediate times"):
        consistency_sigmas(3, 80.0, SD)
    assert len(consistency_sigmas(3, 80.0, SD, mid_times=(1.2, 0.6))) == 4
    with pytest.raises(ValueError, match="must decrease"):
        consistency_sigmas(2, 1.0, SD, mid_times=(1.5,))


@pytest.mark.slow
def test_distillation_flops_match_the_flop_counter():
    student, teacher = tiny(2), tiny(2, seed=1)
    weight = AdaptiveWeight(SD)
    cond = torch.randn(2, 5, 16)
    velocity = guided_velocity(teacher, cond, torch.zeros(2, 5, 16), 3.0)
    with FlopCounterMode(display=False) as counter, plain_attention():
        loss, _ = scd_loss(student, velocity, weight, torch.randn(2, 4, 8, 8), cond, -0.8, 1.6, 80.0, 1.0)
        loss.backward()
    ours = 2 * distill_flops_per_sample(student.net, 8, 5, guidance=True, weight=weight)
    assert abs(counter.get_total_flops() - ours) / ours < 0.005, (counter.get_total_flops(), ours)
    with FlopCounterMode(display=False) as jvp_counter:
        student_jvp(student, torch.randn(2, 4, 8, 8), torch.tensor([.3, .9]), cond, torch.randn(2, 4, 8, 8))
    assert jvp_counter.get_total_flops() == 2 * jvp_flops(student.net, 8, 5)
    assert 2.5 < jvp_flops(student.net, 8, 5) / forward_flops(student.net, 8, 5) < 3.0


def _consistency_gap(student_dir, teacher_dir, cond, null, guidance):
    """Mean squared distances of f(x, sigma) to the guided teacher's ODE endpoint from x: (one step, sigma 1, 3, 10).

    One step starts from fixed noise x = 80 z; at sigma 1, 3 and 10, x is the teacher's sample noised to sigma (the mean
    of the three is returned). The student sees the caption alone: the guidance is baked in.
    """
    from micro_diffusion import load_exported
    from micro_diffusion.diffusion.sampling import guided_denoiser, karras_sigmas, sample_heun

    t_net, t_cfg, _ = load_exported(teacher_dir)
    s_net, s_cfg, _ = load_exported(student_dir)
    teacher = guided_denoiser(EDMPrecond(t_net.eval(), t_cfg["sigma_data"]), cond, null, guidance)
    student = EDMPrecond(s_net.eval(), s_cfg["sigma_data"])
    gen = torch.Generator().manual_seed(0)
    noise = 80 * torch.randn(cond.shape[0], 4, 8, 8, generator=gen)
    x0 = sample_heun(teacher, noise.clone(), karras_sigmas(20), None)  # the ODE endpoint from the fixed noise
    with torch.no_grad():
        one_step = float(((student(noise, torch.full((x0.shape[0],), 80.0), cond) - x0) ** 2).mean())
    gaps = []
    for sigma in (1.0, 3.0, 10.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        ode_end = sample_heun(teacher, x.clone(), karras_sigmas(20, 0.002, sigma), None)
        with torch.no_grad():
            gaps.append(float(((student(x, torch.full((x.shape[0],), sigma), cond) - ode_end) ** 2).mean()))
    return one_step, sum(gaps) / len(gaps)


DISTILL_STEPS = 60


@pytest.mark.slow
def test_a_short_distillation_brings_the_student_towards_the_guided_teachers_ode(tmp_path, capsys):
    import json

    import numpy as np
    from tiny_runs import REPO, tiny_overrides, write_shards

    from micro_diffusion.cli import main as cli
    from micro_diffusion.training.export import export_run

    data, runs = tmp_path / "data", tmp_path / "runs"
    write_shards(data / "latents", 64, prefix="t", seed=0)
    teacher_args = tiny_overrides(data, runs, steps=120) + ["diffusion.mask_ratio=0.0", "optimizer.lr=3e-3"]
    assert cli(["train", str(REPO / "recipes" / "demo_masked.yaml"), *teacher_args]) == 0
    teacher = export_run(runs / "demo_masked", tmp_path / "teacher")
    distill_args = tiny_overrides(data, runs, steps=DISTILL_STEPS) + [
        "stages=[]", "init_from=null", f"init_checkpoint={runs / 'demo_masked/checkpoints/latest-rank0.pt'}",
        "distill.guidance=2.0", "distill.tangent_warmup=10", "optimizer.lr=3e-4"]
    assert cli(["distill", str(REPO / "recipes" / "demo_distill.yaml"), *distill_args]) == 0
    student = export_run(runs / "demo_distill", tmp_path / "student")
    config = json.loads((student / "config.json").read_text())
    assert config["distilled"]["guidance"] == 2.0
    assert "distilled" not in json.loads((teacher / "config.json").read_text())

    # the four caption embeddings write_shards trains on (its first draw from default_rng(seed))
    cond = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 8, 32)).astype(np.float16)).float()
    before = _consistency_gap(teacher, teacher, cond, torch.zeros(8, 32), 2.0)  # the student starts as the teacher
    after = _consistency_gap(student, teacher, cond, torch.zeros(8, 32), 2.0)
    assert after[0] < 0.85 * before[0] and after[1] < 0.75 * before[1], (before, after)

    args = ["sample", str(student), "--prompt", "pattern 0", "--out", str(tmp_path / "s")]
    capsys.readouterr()
    assert cli(args + ["--sampler", "heun"]) == 2  # a diffusion sampler on a student
    assert re.search("distilled student .* --sampler consistency", capsys.readouterr().err)
    assert cli(args + ["--sampler", "consistency", "--steps", "2", "--guidance", "3"]) == 2
    assert "drop --guidance 3" in capsys.readouterr().err
    assert cli(args + ["--sampler", "consistency", "--steps", "3"]) == 2  # no default intermediate times for 3
    assert "consistency sampling takes --steps 1, 2, 4, not 3" in capsys.readouterr().err
    assert cli(["sample", str(teacher), "--prompt", "pattern 0", "--sampler", "consistency", "--out",
                str(tmp_path / "t")]) == 2
    assert "is a diffusion model" in capsys.readouterr().err
