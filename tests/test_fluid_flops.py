"""Analytic FLOPs of Fluid against torch's FlopCounterMode: the forward parts, a training step and sampling."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.cost.fluid_flops import (
    fluid_forward_flops,
    fluid_head_flops,
    fluid_sample_flops_per_image,
    fluid_train_flops_per_sample,
    masked_tokens,
)
from micro_diffusion.models.fluid import create_fluid


def counted(fn) -> int:
    """FlopCounterMode's total for fn(), attention on the math backend, one thread (tiny products gain nothing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.set_num_threads(threads)
    return counter.get_total_flops()


def close(ours: float, measured: float, tol: float = 0.02) -> bool:
    return abs(ours - measured) <= tol * measured


@pytest.mark.parametrize("name, device, latent, L", [
    ("Fluid_369M", "meta", 32, 77), ("Fluid_Tiny", "cpu", (8, 12), 9), ("Fluid_Micro", "cpu", 16, 77)])
@pytest.mark.parametrize("order", ["random", "raster"])
def test_forward_parts_agree_with_flop_counter(name, device, latent, L, order):
    torch.manual_seed(0)
    with torch.device(device):
        net = create_fluid(name, latent_size=latent, caption_dim=64, order=order)
        grid = net.grid()
        T = grid[0] * grid[1]
        tokens, caption = torch.randn(2, T, net.token_dim), torch.randn(2, L, 64)
        mask = torch.arange(T)[None].expand(2, T) % 3 == 0
        x, t, c = torch.randn(5, net.token_dim), torch.randint(0, 1000, (5,)), torch.randn(5, net.cfg.width)
    ours = fluid_forward_flops(net, latent, L)
    text = net.encode_text(caption)
    assert counted(lambda: net.encode_text(caption)) == 2 * ours["aligner"]  # two samples
    assert counted(lambda: net.decode(tokens, mask, text, grid=grid)) == 2 * ours["transformer"]
    assert counted(lambda: net.head(x, t, c)) == 5 * fluid_head_flops(net) and ours["head"] == 0


def _hand_loss(net, tokens, caption, count):
    """A training step's products without diffusion/fluid.py: the first `count` tokens of a fixed order masked, the
    head on each of them diffusion_batch_mul times."""
    N, T, d = tokens.shape
    order = torch.arange(T).flip(0)[None].expand(N, T)  # (N, T), a fixed order
    idx = order[:, :count].to(tokens.device)  # (N, count): gather keeps the shapes static (meta device)
    mask = torch.zeros(N, T, dtype=torch.bool, device=tokens.device).scatter(1, idx, True)
    z = net(tokens, mask, caption)  # (N, T, D)
    rows = z.gather(1, idx[..., None].expand(N, count, z.shape[-1])).repeat(net.cfg.diffusion_batch_mul, 1, 1)
    M = rows.shape[0] * count
    x_t = torch.randn(M, d, device=tokens.device)
    out = net.head(x_t, torch.randint(0, 1000, (M,), device=tokens.device), rows.reshape(M, -1))
    out.square().mean().backward()


@pytest.mark.parametrize("name, ratio", [("Fluid_369M", 0.75), ("Fluid_1B", 1.0)])
def test_train_step_agrees_on_large_nets(name, ratio):
    with torch.device("meta"):
        net = create_fluid(name, latent_size=32)
        tokens, caption = torch.randn(1, 256, 16), torch.randn(1, 77, 1024)
    count = math.ceil(256 * ratio)
    measured = counted(lambda: _hand_loss(net, tokens, caption, count))
    ours = fluid_train_flops_per_sample(net, 32, 77, mask_ratio=ratio)
    assert close(ours, measured, 0.005), (ours / 1e9, measured / 1e9)


def test_train_step_agrees_on_a_tiny_net():
    torch.manual_seed(0)
    net = create_fluid("Fluid_Tiny", latent_size=16, caption_dim=1024)
    tokens, caption = torch.randn(1, 64, 16), torch.randn(1, 77, 1024)
    measured = counted(lambda: _hand_loss(net, tokens, caption, 48))
    ours = fluid_train_flops_per_sample(net, 16, 77, mask_ratio=0.75)
    assert close(ours, measured, 0.005), (ours, measured)
    # the plain 3 x forward overcounts the first layers' input gradients by more than 2% at this size
    fwd = fluid_forward_flops(net, 16, 77)
    plain = 3 * (fwd["aligner"] + fwd["transformer"] + 48 * 4 * fluid_head_flops(net))
    assert not close(plain, measured)


def test_masked_tokens_by_order():
    with torch.device("meta"):
        random, raster = create_fluid("Fluid_Micro"), create_fluid("Fluid_Micro", order="raster")
    assert masked_tokens(random, 256, 0.7) == 180 and masked_tokens(random, 256, 1.0) == 256
    assert masked_tokens(raster, 256, 0.7) == 256 and masked_tokens(raster, 256) == 256
    expected = masked_tokens(random, 256)
    assert 0.86 * 256 < expected < 0.88 * 256  # E[ceil(T r)]: the ratio's mean is about 0.87
    with pytest.raises(ValueError, match="mask_ratio"):
        masked_tokens(random, 256, 0.0)
    one = fluid_train_flops_per_sample(random, 32, 77, mask_ratio=0.7)
    assert one < fluid_train_flops_per_sample(random, 32, 77) < fluid_train_flops_per_sample(random, 32, 77, 1.0)


def test_sampling_formula_and_errors():
    with torch.device("meta"):
        net = create_fluid("Fluid_369M")
        raster = create_fluid("Fluid_Micro", order="raster")
    fwd, head = fluid_forward_flops(net, 32, 77), fluid_head_flops(net)
    plain = fluid_sample_flops_per_image(net, 32, 77, steps=64, head_steps=100, guidance=False)
    assert plain == fwd["aligner"] + 64 * fwd["transformer"] + 256 * 100 * head
    assert fluid_sample_flops_per_image(net, 32, 77, 64, 100, guidance=True) == 2 * plain
    assert fluid_sample_flops_per_image(raster, 8, 7, steps=16, head_steps=5) > 0
    with pytest.raises(ValueError, match="steps must be 16"):
        fluid_sample_flops_per_image(raster, 8, 7, steps=8, head_steps=5)
    with pytest.raises(TypeError, match="expected a Fluid"):
        fluid_forward_flops(torch.nn.Linear(2, 2), 32, 77)


# The training step and the sampler of diffusion/fluid.py, as they run.


@pytest.mark.parametrize("order, ratio", [("random", 0.75), ("random", 1.0), ("raster", None)])
def test_fluid_loss_agrees_with_flop_counter(order, ratio):
    from micro_diffusion.diffusion.fluid import fluid_loss
    from micro_diffusion.diffusion.head import HeadSchedule

    torch.manual_seed(0)
    net = create_fluid("Fluid_Tiny", latent_size=16, caption_dim=64, order=order)
    latents, caption = torch.randn(2, 4, 16, 16), torch.randn(2, 9, 64)
    schedule = HeadSchedule.cosine()
    g = torch.Generator().manual_seed(0)
    measured = counted(lambda: fluid_loss(net, latents, caption, 1.0, schedule, g, g, mask_ratio=ratio).backward())
    ours = 2 * fluid_train_flops_per_sample(net, 16, 9, mask_ratio=ratio)  # two samples
    assert close(ours, measured), (ours, measured)


@pytest.mark.parametrize("order, steps, guidance", [("random", 4, 3.0), ("random", 6, 1.0), ("raster", 16, 2.0)])
def test_generate_fluid_agrees_with_flop_counter(order, steps, guidance):
    from micro_diffusion.diffusion.fluid import generate_fluid

    torch.manual_seed(0)
    net = create_fluid("Fluid_Micro", latent_size=8, caption_dim=64, order=order).eval()
    cond, null = torch.randn(2, 7, 64), torch.randn(7, 64)
    measured = counted(lambda: generate_fluid(net, cond, null, [1, 2], steps, 3, 1.0, guidance, (4, 8, 8), 1.0))
    ours = 2 * fluid_sample_flops_per_image(net, 8, 7, steps, 3, guidance=guidance != 1.0)  # two images
    assert close(ours, measured), (ours, measured)
