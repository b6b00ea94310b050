"""Fluid's math: the head's improved DDPM (schedule, respacing, loss, sampler) and the family's masking, reveal
schedule, guidance, training loss and sampler, on hand-made tensors and a small stand-in network."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from micro_diffusion.diffusion.fluid import (
    MASK_RATIO_MAX,
    MASK_RATIO_MIN,
    draw_mask_ratio,
    expected_masked,
    fluid_loss,
    generate_fluid,
    guidance_at,
    mask_from_order,
    masked_after,
    random_orders,
)
from micro_diffusion.diffusion.head import (
    X0_BOUND,
    HeadSchedule,
    cosine_betas,
    head_loss,
    head_sample,
    q_sample,
    reverse_step,
    spaced_steps,
    vb_bits,
)
from micro_diffusion.models.patches import patch_grid, unpatchify
from micro_diffusion.utils.seeds import seeded_generator

TRAIN = HeadSchedule.cosine()


def _f(u: float) -> float:
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


# ---- the head's diffusion ----

def test_cosine_betas_follow_alpha_bar_and_clip():
    betas = cosine_betas()
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(4.12842e-5, rel=1e-4) and betas[-1] == 0.999  # the last step is clipped
    assert (np.diff(betas) > 0).all()
    abar = np.cumprod(1 - betas)
    expect = np.array([_f((t + 1) / 1000) / _f(0) for t in range(999)])
    np.testing.assert_allclose(abar[:-1], expect, rtol=1e-10)


def test_respacing_100_of_1000():
    spaced = TRAIN.respaced(100)
    assert spaced.num_timesteps == 100
    assert list(spaced.timestep_map[:8]) == [0, 10, 20, 30, 40, 50, 61, 71] and spaced.timestep_map[-1] == 999
    np.testing.assert_allclose(spaced.alphas_cumprod, TRAIN.alphas_cumprod[spaced.timestep_map], rtol=1e-9)
    assert spaced.betas[0] == TRAIN.betas[0] and (spaced.betas[1:] > TRAIN.betas[spaced.timestep_map[1:]]).all()
    same = TRAIN.respaced(1000)
    np.testing.assert_allclose(same.betas, TRAIN.betas, rtol=1e-12)
    assert (same.timestep_map == np.arange(1000)).all()
    assert spaced_steps(10, 4) == [0, 3, 6, 9] and spaced_steps(10, 1) == [0]
    with pytest.raises(ValueError, match="1001 steps out of 1000"):
        TRAIN.respaced(1001)


def test_q_sample_ends():
    x0, noise = torch.full((2, 4), 0.5), torch.linspace(-1, 1, 8).reshape(2, 4)
    t = torch.tensor([0, 999])
    x_t = q_sample(TRAIN, x0, t, noise)
    torch.testing.assert_close(x_t[0], x0[0], atol=0.01, rtol=0)  # barely noised at t = 0
    torch.testing.assert_close(x_t[1], noise[1], atol=1e-3, rtol=0)  # pure noise at t = 999
    a = TRAIN.alphas_cumprod[500]
    x_mid = q_sample(TRAIN, x0, torch.tensor([500, 500]), noise)
    torch.testing.assert_close(x_mid, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)


def _fixed_head(eps: torch.Tensor, v: torch.Tensor, seen: list | None = None):
    """A head returning given values (and recording the steps it is given)."""
    def head(x, t, c):
        if seen is not None:
            seen.append(t.clone())
        return torch.cat([eps, v], dim=1)
    return head


def test_head_loss_on_hand_made_tensors():
    torch.manual_seed(0)
    x0, noise, c = torch.rand(3, 4) - 0.5, torch.randn(3, 4), torch.zeros(3, 8)
    t = torch.tensor([500, 500, 500])
    minus, plus = -torch.ones(3, 4), torch.ones(3, 4)
    # exact epsilon, v = -1 (posterior variance): both terms vanish
    assert head_loss(_fixed_head(noise, minus), x0, c, t, noise, TRAIN).abs().max() < 1e-5
    # epsilon off by 0.5: MSE 0.25, KL from the mean shift coef1 * sqrt(1/abar - 1) * 0.5 over the posterior variance
    a, c1, var = TRAIN.alphas_cumprod[500], TRAIN.posterior_mean_coef1[500], TRAIN.posterior_variance[500]
    kl = 0.5 * (c1 * math.sqrt(1 / a - 1) * 0.5) ** 2 / var / math.log(2)
    loss = head_loss(_fixed_head(noise + 0.5, minus), x0, c, t, noise, TRAIN)
    torch.testing.assert_close(loss, torch.full((3,), 0.25 + kl), rtol=1e-4, atol=0)
    # exact epsilon, v = 1 (variance beta): KL of two centred Gaussians (at t = 1, where beta is twice beta tilde)
    b, var = TRAIN.betas[1], TRAIN.posterior_variance[1]
    kl = 0.5 * (math.log(b) - math.log(var) - 1 + var / b) / math.log(2)
    torch.testing.assert_close(head_loss(_fixed_head(noise, plus), x0, c, torch.ones_like(t), noise, TRAIN),
                               torch.full((3,), kl), rtol=1e-3, atol=0)


def test_head_loss_first_step_is_the_decoder_nll():
    x0 = torch.tensor([[0.2, -0.3], [1.0, 1.0]])  # an inner value, and the top bin (open above)
    noise = torch.randn(2, 2)
    t = torch.zeros(2, dtype=torch.long)
    loss = head_loss(_fixed_head(noise, -torch.ones(2, 2)), x0, torch.zeros(2, 1), t, noise, TRAIN)
    sigma = math.sqrt(TRAIN.posterior_variance[1])  # the mean is x0 exactly: mu tilde at t = 0 is x0
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    inner = -math.log(phi(1 / 255 / sigma) - phi(-1 / 255 / sigma)) / math.log(2)
    top = -math.log(1 - phi(-1 / 255 / sigma)) / math.log(2)
    torch.testing.assert_close(loss, torch.tensor([inner, top]), rtol=2e-3, atol=0)


def test_head_loss_trains_the_mean_by_mse_and_the_variance_by_the_bound():
    torch.manual_seed(1)
    x0, noise = torch.randn(5, 4), torch.randn(5, 4)
    out = torch.randn(5, 8, requires_grad=True)
    t = torch.randint(1, 1000, (5,))
    head_loss(lambda x, s, c: out, x0, torch.zeros(5, 1), t, noise, TRAIN).sum().backward()
    torch.testing.assert_close(out.grad[:, :4], 2 * (out[:, :4] - noise).detach() / 4)  # the MSE's gradient only
    assert (out.grad[:, 4:].abs() > 0).all()


def test_head_loss_on_a_respaced_schedule_maps_steps_and_scales_the_bound():
    spaced = TRAIN.respaced(100)
    x0, noise, seen = torch.rand(2, 4), torch.randn(2, 4), []
    eps, v = noise + 0.1, torch.zeros(2, 4)
    t = torch.tensor([5, 99])
    loss = head_loss(_fixed_head(eps, v, seen), x0, torch.zeros(2, 1), t, noise, spaced)
    assert seen[0].tolist() == [50, 999]  # the head sees steps of the original process
    vb = vb_bits(spaced, x0, q_sample(spaced, x0, t, noise), t, eps, v)
    torch.testing.assert_close(loss, 0.01 + 0.1 * vb)


def _oracle(a: torch.Tensor):
    """The exact epsilon when every token is `a`: eps = (x_t - sqrt(abar_t) a) / sqrt(1 - abar_t), t original."""
    abar = torch.from_numpy(TRAIN.alphas_cumprod)

    def head(x, t, c):
        ab = abar[t].float()[:, None]
        return torch.cat([(x - ab.sqrt() * a) / (1 - ab).sqrt(), torch.zeros_like(x)], dim=1)
    return head


def test_head_sample_finds_a_point_mass():
    a = torch.tensor([0.3, -1.2, 0.8, 0.0])
    noise = torch.randn(6, 101, 4)
    x = head_sample(_oracle(a), torch.zeros(6, 1), noise, TRAIN.respaced(100), temperature=1.0)
    torch.testing.assert_close(x, a.expand(6, 4), atol=1e-4, rtol=0)


def test_head_sample_noise_temperature_and_guidance():
    spaced = TRAIN.respaced(10)
    head = nn.Linear(4 + 1 + 3, 8)
    net = lambda x, t, c: torch.tanh(head(torch.cat([x, t[:, None] / 1000, c], dim=1)))  # bounded
    c, null_c, noise = torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 11, 4)
    base = head_sample(net, c, noise, spaced, 0.9)
    moved = noise.clone()
    moved[:, -1] += 1  # the last step adds no noise
    torch.testing.assert_close(head_sample(net, c, moved, spaced, 0.9), base)
    moved[:, 1:] += torch.randn(3, 10, 4)
    assert not torch.allclose(head_sample(net, c, moved, spaced, 0.9), base)
    torch.testing.assert_close(head_sample(net, c, moved, spaced, 0.0), head_sample(net, c, noise, spaced, 0.0))
    w = torch.tensor([1.0, 2.5, 4.0])

    def guided(x, t, cc):  # eps_u + w (eps_c - eps_u), the variance values of the conditional half
        eps_c, v = net(x, t, c).chunk(2, dim=1)
        eps_u = net(x, t, null_c)[:, :4]
        return torch.cat([eps_u + w[:, None] * (eps_c - eps_u), v], dim=1)
    out = head_sample(net, c, noise, spaced, 0.9, guidance=w, null_c=null_c)
    torch.testing.assert_close(out, head_sample(guided, c, noise, spaced, 0.9))
    torch.testing.assert_close(out[0], base[0], atol=1e-5, rtol=0)  # w = 1 is the conditional head
    with pytest.raises(ValueError, match="together"):
        head_sample(net, c, noise, spaced, guidance=w)
    with pytest.raises(ValueError, match="needs 11"):
        head_sample(net, c, noise[:, :5], spaced)


def test_sampling_bounds_the_x0_estimate_an_imprecise_head_blows_up():
    """An epsilon 0.05 off at t = T is multiplied by 1 / sqrt(abar_T) ~ 1e4 in the x0 estimate: unbounded, the first
    reverse step lands far outside the data; sampling bounds the estimate, so the tokens stay within X0_BOUND."""
    spaced = TRAIN.respaced(100)

    def off(x, t, c):  # the exact epsilon of zero data (eps = x_t / sqrt(1 - abar)) plus a small constant error
        abar = torch.from_numpy(TRAIN.alphas_cumprod).float()[t][:, None]
        return torch.cat([x / (1 - abar).sqrt() + 0.05, torch.zeros_like(x)], dim=1)

    x_t = torch.randn(64, 4)
    last = spaced.num_timesteps - 1
    eps = off(x_t, torch.full((64,), int(spaced.timestep_map[last])), None)[:, :4]
    unbounded, _ = reverse_step(spaced, x_t, last, eps, torch.zeros_like(x_t))
    bounded, _ = reverse_step(spaced, x_t, last, eps, torch.zeros_like(x_t), X0_BOUND)
    assert unbounded.abs().min() > 10 and bounded.abs().max() < 1  # the unbounded step lands about 16 from zero
    x = head_sample(off, torch.zeros(64, 1), torch.randn(64, 101, 4), spaced, temperature=1.0)
    assert x.abs().max() <= X0_BOUND


# ---- masking, orders, the reveal schedule ----

def test_mask_ratio_draws():
    g = seeded_generator(0)
    r = np.array([draw_mask_ratio(g) for _ in range(20000)])
    assert r.min() >= MASK_RATIO_MIN and r.max() <= MASK_RATIO_MAX and r.min() < 0.705 and r.max() > 0.995
    assert r.mean() == pytest.approx(0.8670, abs=0.003)  # 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2))
    assert (r < 0.85).mean() == pytest.approx(0.4189, abs=0.012)  # (Phi(-0.6) - Phi(-1.2)) / (Phi(0) - Phi(-1.2))
    assert draw_mask_ratio(seeded_generator(5)) == draw_mask_ratio(seeded_generator(5))


def test_expected_masked():
    r = np.linspace(0.7, 1.0, 300001)[1:] - 0.5e-6  # midpoints
    density = np.exp(-0.5 * ((r - 1.0) / 0.25) ** 2)
    for T in (16, 256):
        numeric = (np.ceil(T * r) * density).sum() / density.sum()
        assert expected_masked(T) == pytest.approx(numeric, rel=1e-4)
    assert expected_masked(4096) / 4096 == pytest.approx(0.8670, abs=1e-3)
    g = seeded_generator(1)
    draws = [math.ceil(16 * draw_mask_ratio(g)) for _ in range(20000)]
    assert np.mean(draws) == pytest.approx(expected_masked(16), abs=0.03)


def test_random_orders_and_masks():
    orders = random_orders(4, 10, seeded_generator(3))
    assert orders.dtype == torch.long and (orders.sort(dim=1).values == torch.arange(10)).all()
    assert torch.equal(orders, random_orders(4, 10, seeded_generator(3)))
    assert not torch.equal(orders, random_orders(4, 10, seeded_generator(4)))
    assert len({tuple(o) for o in orders.tolist()}) == 4
    per_row = random_orders(2, 10, [seeded_generator(8), seeded_generator(9)])
    assert torch.equal(per_row[1], torch.randperm(10, generator=seeded_generator(9)))
    mask = mask_from_order(torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]]), 2)
    assert mask.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_masked_after_counts():
    assert masked_after(16, 8) == [15, 14, 13, 11, 8, 6, 3, 0]
    counts = masked_after(256, 64)
    assert len(counts) == 64 and counts[:14] == list(range(255, 242, -1)) + [241]
    assert counts[31] == 181 and counts[47] == 97 and counts[-4:] == [18, 12, 6, 0]
    assert all(a > b for a, b in zip([256, *counts[:-1]], counts, strict=True))  # each step reveals at least one token
    assert masked_after(5, 5, "raster") == [4, 3, 2, 1, 0]
    assert masked_after(3, 6) == [2, 1, 1, 1, 1, 0]  # more steps than tokens: the last one waits
    with pytest.raises(ValueError, match="16 tokens need 16 steps"):
        masked_after(16, 8, "raster")


def test_guidance_rises_linearly():
    assert guidance_at(5.0, 256, 256) == 1.0 and guidance_at(5.0, 256, 0) == 5.0
    assert guidance_at(5.0, 256, 128) == 3.0 and guidance_at(1.0, 256, 17) == 1.0


# ---- the training loss and the sampler, on a stand-in with the network's interface ----

class StandIn(nn.Module):
    """Fluid's interface with one linear per part: rows never mix across images, tokens mix within one."""

    def __init__(self, order: str = "random", mul: int = 2, width: int = 24, caption_dim: int = 8):
        super().__init__()
        self.cfg = SimpleNamespace(order=order, diffusion_batch_mul=mul)
        self.in_channels, self.patch_size, self.token_dim = 4, 2, 16
        self.text, self.embed = nn.Linear(caption_dim, width), nn.Linear(16, width)
        self.mix = nn.Linear(width, width)
        self.mask_token, self.start = nn.Parameter(torch.randn(width)), nn.Parameter(torch.randn(width))
        self.head_net = nn.Sequential(nn.Linear(16 + 1 + width, 32), nn.SiLU(), nn.Linear(32, 32))

    def head(self, x, t, c):
        """Epsilon of unit-Gaussian data, sqrt(1 - abar) x, plus a learned sqrt(abar) delta: samples stay O(1)."""
        delta, v = torch.tanh(self.head_net(torch.cat([x, t[:, None].float() / 1000, c], dim=1))).chunk(2, dim=1)
        abar = torch.from_numpy(TRAIN.alphas_cumprod).float()[t][:, None]  # (M, 1)
        return torch.cat([(1 - abar).sqrt() * x + abar.sqrt() * delta, v], dim=1)

    def grid(self, latent_size=8):
        return patch_grid(latent_size, self.patch_size)

    def patchify(self, latents):
        N, C, H, W = latents.shape
        x = latents.reshape(N, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
        return x.reshape(N, (H // 2) * (W // 2), 4 * C)

    def encode_text(self, caption):
        return self.text(caption)

    def decode(self, tokens, mask, text, grid=None):
        x = self.embed(tokens)  # (N, T, width)
        if self.cfg.order == "random":
            x = torch.where(mask[..., None], self.mask_token, x)
            context = x.mean(dim=1, keepdim=True)
        else:  # shifted right, each position sees the tokens before it
            x = torch.cat([self.start.expand(x.shape[0], 1, -1), x[:, :-1]], dim=1)
            context = x.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1)[:, None]
        return torch.tanh(x + self.mix(context) + text.mean(dim=1, keepdim=True))

    def forward(self, tokens, mask, caption, grid=None):
        return self.decode(tokens, mask, self.encode_text(caption))


def test_stand_in_patchify_inverts_unpatchify():
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(unpatchify(StandIn().patchify(x), (4, 3), 2, 4), x)


def test_fluid_loss_repeats_rows_and_backpropagates():
    torch.manual_seed(0)
    net, seen = StandIn(mul=3), []
    net.head = lambda x, t, c, f=net.head: seen.append((x, t, c)) or f(x, t, c)
    latents, caption = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    loss = fluid_loss(net, latents, caption, 0.5, TRAIN, seeded_generator(0), seeded_generator(1), mask_ratio=0.75)
    x_t, t, c = seen[0]
    M = 2 * 12  # ceil(16 x 0.75) masked tokens per image
    assert x_t.shape == (3 * M, 16) and torch.equal(c[:M], c[M:2 * M]) and torch.equal(c[:M], c[2 * M:])
    assert not torch.equal(t[:M], t[M:2 * M]) and not torch.allclose(x_t[:M], x_t[M:2 * M])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in net.named_parameters():
        assert name == "start" or p.grad is not None and p.grad.abs().sum() > 0, name
    again = fluid_loss(net, latents * 2, caption, 1.0, TRAIN, seeded_generator(0), seeded_generator(1), 0.75)
    torch.testing.assert_close(again, loss)  # tokens are the latents over sigma_data


def test_fluid_loss_draws_the_ratio_and_raster_trains_every_token():
    net, seen = StandIn(mul=2), []
    net.head = lambda x, t, c, f=net.head: seen.append(x.shape[0]) or f(x, t, c)
    latents, caption = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 8)
    a = fluid_loss(net, latents, caption, 1.0, TRAIN, seeded_generator(4), seeded_generator(5))
    b = fluid_loss(net, latents, caption, 1.0, TRAIN, seeded_generator(4), seeded_generator(5))
    assert torch.equal(a, b)
    g = seeded_generator(4)  # the orders first, then the ratio, from one generator
    random_orders(3, 16, g)
    assert seen[0] == 3 * 2 * math.ceil(16 * draw_mask_ratio(g))
    raster, rows = StandIn("raster", mul=2), []
    raster.head = lambda x, t, c, f=raster.head: rows.append(x.shape[0]) or f(x, t, c)
    fluid_loss(raster, latents, caption, 1.0, TRAIN).backward()
    assert rows == [3 * 16 * 2]


def _recording(net: nn.Module) -> list:
    """Record (tokens, mask, text rows) of each decode call."""
    calls, decode = [], net.decode
    net.decode = lambda tokens, mask, text, grid=None: calls.append(
        (tokens.clone(), mask.clone(), text.shape[0])) or decode(tokens, mask, text, grid)
    return calls


def _generate(net, cond, seeds, steps=8, guidance=1.0, null=None, sigma_data=1.0):
    null = torch.zeros(5, 8) if null is None else null
    return generate_fluid(net, cond, null, seeds, steps, 4, 0.9, guidance, (4, 8, 8), sigma_data)


def test_generate_fluid_is_reproducible_per_image():
    torch.manual_seed(0)
    net, cond = StandIn(), torch.randn(3, 5, 8)
    batch = _generate(net, cond, [3, 7, 11], guidance=3.0)
    assert batch.shape == (3, 4, 8, 8) and torch.isfinite(batch).all()
    torch.testing.assert_close(_generate(net, cond[1:2], [7], guidance=3.0)[0], batch[1], atol=1e-5, rtol=0)
    assert torch.equal(_generate(net, cond, [3, 7, 11], guidance=3.0), batch)
    assert not torch.allclose(_generate(net, cond, [3, 8, 11], guidance=3.0)[1], batch[1])
    torch.testing.assert_close(_generate(net, cond, [3, 7, 11], guidance=3.0, sigma_data=2.0), 2 * batch)


def test_generate_fluid_guidance_one_never_runs_the_null_branch():
    torch.manual_seed(0)
    net, cond = StandIn(), torch.randn(2, 5, 8)
    calls = _recording(net)
    out = _generate(net, cond, [1, 2], null=torch.full((5, 8), float("nan")))
    assert torch.isfinite(out).all() and len(calls) == 8 and all(c[0].shape[0] == 2 and c[2] == 2 for c in calls)
    calls.clear()
    guided = _generate(net, cond, [1, 2], guidance=4.0)
    assert all(c[0].shape[0] == 4 and c[2] == 4 for c in calls) and not torch.allclose(guided, out)


def test_generate_fluid_reveals_every_token_once_in_the_seed_order():
    torch.manual_seed(0)
    net = StandIn()
    calls = _recording(net)
    out = net.patchify(_generate(net, torch.randn(2, 5, 8), [4, 9]))  # (2, 16, 16)
    counts = masked_after(16, 8)
    masks = [m for _, m, _ in calls] + [torch.zeros(2, 16, dtype=torch.bool)]
    revealed = torch.zeros(2, 16, dtype=torch.long)
    for k in range(8):
        assert (masks[k].sum(dim=1) == [16, *counts][k]).all()
        assert not (masks[k + 1] & ~masks[k]).any()  # a revealed token stays revealed
        revealed += (masks[k] & ~masks[k + 1]).long()
        known = ~masks[k]
        assert torch.equal(calls[k][0][known], out[known]) and (calls[k][0][~known] == 0).all()
    assert (revealed == 1).all() and (out != 0).all()
    order = torch.randperm(16, generator=seeded_generator(9))  # image 1's order: its seed's first draw
    assert set(order[counts[0]:].tolist()) == set((~masks[1][1]).nonzero().flatten().tolist())


def test_generate_fluid_raster_reveals_one_token_a_step_in_raster_order():
    torch.manual_seed(0)
    net = StandIn("raster")
    calls = _recording(net)
    out = net.patchify(_generate(net, torch.randn(2, 5, 8), [1, 2], steps=16, guidance=2.0))
    assert len(calls) == 16
    for k, (tokens, mask, _) in enumerate(calls):
        assert (tokens[:2, k:] == 0).all() and torch.equal(tokens[:2, :k], out[:, :k])
        assert mask[:2].sum(dim=1).tolist() == [16 - k, 16 - k] and not mask[:2, :k].any()
    with pytest.raises(ValueError, match="16 tokens need 16 steps"):
        _generate(net, torch.randn(2, 5, 8), [1, 2], steps=8)
