"""Training and sampling of the Fluid family (Fan et al. 2024, on MAR, Li et al. 2024): masked autoregression over
continuous tokens, each token drawn by the per-token diffusion head of diffusion/head.py.

Training masks the first ceil(T r) tokens of a random order (r drawn once per batch), runs the network on the rest, and
trains the head on the masked tokens. Sampling reveals tokens over `steps` passes on a cosine schedule (raster order:
one token a pass, left to right), every pass rerunning the network on all tokens, guidance rising linearly.

The network is models.fluid.Fluid or anything with its interface: patchify, grid, encode_text, decode, forward, head,
cfg.order, cfg.diffusion_batch_mul, in_channels, patch_size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..models.patches import unpatchify
from ..utils.seeds import draw, seeded_generator
from .head import HeadSchedule, head_loss, head_sample

# Training mask ratio r ~ N(loc, scale) truncated to [min, max]; its mean is about 0.867.
MASK_RATIO_LOC, MASK_RATIO_SCALE, MASK_RATIO_MIN, MASK_RATIO_MAX = 1.0, 0.25, 0.7, 1.0
Generators = torch.Generator | Sequence[torch.Generator] | None


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _ratio_cdf(r: float) -> float:
    """P(ratio <= r) under the truncated normal of the training mask ratio."""
    lo = _phi((MASK_RATIO_MIN - MASK_RATIO_LOC) / MASK_RATIO_SCALE)
    hi = _phi((MASK_RATIO_MAX - MASK_RATIO_LOC) / MASK_RATIO_SCALE)
    r = min(max(r, MASK_RATIO_MIN), MASK_RATIO_MAX)
    return (_phi((r - MASK_RATIO_LOC) / MASK_RATIO_SCALE) - lo) / (hi - lo)


def draw_mask_ratio(generator: torch.Generator | None = None) -> float:
    """One mask ratio from the truncated normal, by the inverse CDF of one uniform draw of `generator`.

    Not scipy's truncnorm: it draws from numpy's global state, and the project's draws come from torch generators.
    """
    lo = _phi((MASK_RATIO_MIN - MASK_RATIO_LOC) / MASK_RATIO_SCALE)
    hi = _phi((MASK_RATIO_MAX - MASK_RATIO_LOC) / MASK_RATIO_SCALE)
    u = draw("rand", (1,), generator, "cpu", torch.float64)  # (1,) in [0, 1)
    z = torch.special.ndtri(lo + u * (hi - lo))  # Phi^-1 of a uniform on [Phi(a), Phi(b)]
    return min(max(float(MASK_RATIO_LOC + MASK_RATIO_SCALE * z), MASK_RATIO_MIN), MASK_RATIO_MAX)


def expected_masked(T: int) -> float:
    """E[ceil(T r)], the mean number of masked tokens of a training sample: sum_k k P((k-1)/T < r <= k/T), exactly."""
    first = math.ceil(T * MASK_RATIO_MIN)
    return sum(k * (_ratio_cdf(k / T) - _ratio_cdf((k - 1) / T)) for k in range(first, T + 1))


def random_orders(n: int, T: int, generator: Generators = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """n random permutations of 0..T-1, (n, T) long: one generator for all, or one per row (row k its own)."""
    if isinstance(generator, Sequence):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} orders")
        rows = [torch.randperm(T, generator=g, device=g.device) for g in generator]
    else:
        source = generator.device if generator is not None else "cpu"
        rows = [torch.randperm(T, generator=generator, device=source) for _ in range(n)]
    return torch.stack(rows).to(device)  # (n, T)


def mask_from_order(orders: torch.Tensor, count: int) -> torch.Tensor:
    """(N, T) bool, True at the first `count` positions of each order (the unknown tokens)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :count], True)


def masked_after(T: int, num_iter: int, order: str = "random") -> list[int]:
    """Tokens still masked after each of the num_iter sampling steps (0-based k); 0 after the last.

    random: max(1, floor(T cos(pi/2 (k+1)/num_iter))), at most one fewer than before (MaskGIT's cosine schedule);
    raster: T - k - 1, one token a step, so num_iter must be T.
    """
    if num_iter < 1:
        raise ValueError(f"Fluid sampling needs at least one step, got {num_iter}")
    if order == "raster":
        if num_iter != T:
            raise ValueError(f"raster order reveals one token a step: {T} tokens need {T} steps, got {num_iter}")
        return [T - k - 1 for k in range(T)]
    if order != "random":
        raise ValueError(f"unknown Fluid order {order!r}; known: random, raster")
    counts, previous = [], T
    for k in range(num_iter - 1):
        previous = max(1, min(previous - 1, math.floor(T * math.cos(math.pi / 2 * (k + 1) / num_iter))))
        counts.append(previous)
    return [*counts, 0]


def guidance_at(w: float, T: int, masked_k: int) -> float:
    """Guidance of a step on the linear schedule: 1 + (w - 1)(T - masked_k)/T, rising to w as tokens are revealed."""
    return 1.0 + (w - 1.0) * (T - masked_k) / T


def _masked_count(T: int, generator: torch.Generator | None, mask_ratio: float | None) -> int:
    """ceil(T r) for a drawn (or given) ratio r."""
    r = draw_mask_ratio(generator) if mask_ratio is None else mask_ratio
    return math.ceil(T * r)


def fluid_loss(net: nn.Module, latents: torch.Tensor, caption: torch.Tensor, sigma_data: float,
               schedule: HeadSchedule, generator: torch.Generator | None = None,
               noise_generator: torch.Generator | None = None, mask_ratio: float | None = None) -> torch.Tensor:
    """The head's loss on the masked tokens of a batch, each repeated diffusion_batch_mul times: a scalar.

    generator draws the ratio and orders, noise_generator the head's steps and noise (the global RNG when None);
    mask_ratio fixes r instead of drawing it. Raster order trains on every token.
    """
    tokens = net.patchify(latents / sigma_data)  # (N, T, d)
    N, T, d = tokens.shape
    if net.cfg.order == "random":
        orders = random_orders(N, T, generator, tokens.device)  # (N, T)
        mask = mask_from_order(orders, _masked_count(T, generator, mask_ratio))  # (N, T), True = unknown
    else:
        mask = torch.ones(N, T, dtype=torch.bool, device=tokens.device)  # causal net: every token is a target
    z = net(tokens, mask, caption, net.grid(latents.shape[-2:]))  # (N, T, width)
    repeat = net.cfg.diffusion_batch_mul
    target = tokens[mask].repeat(repeat, 1)  # (M, d), M = masked tokens x repeat
    cond = z[mask].repeat(repeat, 1)  # (M, width)
    M = target.shape[0]
    source = noise_generator.device if noise_generator is not None else tokens.device
    t = torch.randint(0, schedule.num_timesteps, (M,), generator=noise_generator, device=source).to(tokens.device)
    noise = draw("randn", (M, d), noise_generator, tokens.device, torch.float32)  # (M, d)
    return head_loss(net.head, target, cond, t, noise, schedule).mean()


def _image_draws(seeds: Sequence[int], T: int, draws: tuple[int, int], order: str,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, from a generator of its own seed: its order (T,), then its head noise (T, head_steps+1, d).

    The mask covers an order's first tokens, so its last ones are revealed first: raster order is T-1, ..., 0.
    """
    orders, noises = [], []
    for seed in seeds:
        g = seeded_generator(seed)  # CPU: the same numbers on every device
        orders.append(torch.randperm(T, generator=g) if order == "random" else torch.arange(T - 1, -1, -1))
        noises.append(draw("randn", (T, *draws), g, "cpu", torch.float32))
    return torch.stack(orders).to(device), torch.stack(noises).to(device)  # (N, T), (N, T, S+1, d)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows x[n, index[n, j]] for every image n and j: (N, r, *rest) from x (N, T, *rest), index (N, r)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def _twice(x: torch.Tensor, guided: bool) -> torch.Tensor:
    """x stacked on itself for the conditional and null halves when guided, else x."""
    return torch.cat([x, x]) if guided else x


@torch.no_grad()
def generate_fluid(net: nn.Module, cond: torch.Tensor, null: torch.Tensor, seeds: Sequence[int], steps: int,
                   head_steps: int, temperature: float, guidance: float, shape: tuple[int, int, int],
                   sigma_data: float) -> torch.Tensor:
    """Latents (N, C, H, W) for captions cond (N, L, D): `steps` passes of the network, each revealing tokens.

    Image k's order and head noise come from seeds[k] alone, so it does not depend on the other images of its batch.
    null (L, D) is the empty caption, used only when guidance != 1.
    """
    N, (C, H, W) = cond.shape[0], shape
    if len(seeds) != N:
        raise ValueError(f"{len(seeds)} seeds for {N} captions")
    if C != net.in_channels:
        raise ValueError(f"the network makes {net.in_channels}-channel latents, asked for {C}")
    device = next(net.parameters()).device
    grid, p = net.grid((H, W)), net.patch_size
    T, d, order = grid[0] * grid[1], C * p * p, net.cfg.order
    counts = masked_after(T, steps, order)
    schedule = HeadSchedule.cosine().respaced(head_steps)
    orders, noise = _image_draws(seeds, T, (head_steps + 1, d), order, device)  # (N, T), (N, T, S+1, d)
    guided = guidance != 1.0
    text = net.encode_text(torch.cat([cond, null.to(cond).expand(N, *null.shape)]) if guided else cond)  # (gN, L, W)
    tokens = torch.zeros(N, T, d, device=device)  # (N, T, d), filled in as revealed
    mask = torch.ones(N, T, dtype=torch.bool, device=device)  # (N, T), True = unknown
    previous = T
    for k in range(steps):
        z = net.decode(_twice(tokens, guided), _twice(mask, guided), text, grid)  # (gN, T, width)
        reveal = orders[:, counts[k]:previous]  # (N, r): the order's positions revealed at step k
        previous = counts[k]
        if reveal.shape[1] == 0:  # more steps than tokens: nothing left to reveal at this step
            continue
        r = reveal.shape[1]
        c = _gather(z[:N], reveal).reshape(N * r, -1)  # (N r, width)
        null_c = _gather(z[N:], reveal).reshape(N * r, -1) if guided else None
        w = torch.full((N * r,), guidance_at(guidance, T, counts[k]), device=device) if guided else None
        x0 = head_sample(net.head, c, _gather(noise, reveal).flatten(0, 1), schedule, temperature, w, null_c)
        rows = torch.arange(N, device=device)[:, None]
        tokens[rows, reveal] = x0.reshape(N, r, d).to(tokens.dtype)
        mask[rows, reveal] = False
    return unpatchify(tokens, grid, p, C) * sigma_data  # (N, C, H, W)
