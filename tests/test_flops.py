"""Analytic FLOP counts against torch's FlopCounterMode on the real networks."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.cost.flops import (
    forward_flops,
    forward_flops_breakdown,
    network_evals,
    sample_flops_per_image,
    train_flops_per_sample,
)
from micro_diffusion.models import create_dit


def measured_train_flops(net, latent_hw, caption_len, mask_ratio, device):
    """FlopCounterMode's count of one forward+backward of one sample, attention on the math backend."""
    h, w = latent_hw
    with torch.device(device):
        x, c_noise = torch.randn(1, net.in_channels, h, w), torch.randn(1)
        captions = torch.randn(1, caption_len, net.cfg.caption_dim)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products gain nothing from threads, and threads stall on a loaded machine
    try:
        # the math backend decomposes attention into matmuls the counter sees; CPU flash attention is not counted
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = net(x, c_noise, captions, mask_ratio=mask_ratio)
            out.sample.float().square().mean().backward()
    finally:
        torch.set_num_threads(threads)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["MicroDiT_Tiny_2", "MicroDiT_XL_2"])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_agrees_with_flop_counter(name, mask_ratio):
    # the real modules on the meta device: shapes only, so the counter sees every product without a minute of CPU
    with torch.device("meta"):
        net = create_dit(name, latent_size=32, caption_dim=1024)
    measured = measured_train_flops(net, (32, 32), 77, mask_ratio, "meta")
    ours = train_flops_per_sample(net, latent_size=32, caption_len=77, mask_ratio=mask_ratio)
    assert abs(ours - measured) / measured < 0.02, (ours / 1e9, measured / 1e9)


@pytest.mark.parametrize(
    "overrides, latent_hw, mask_ratio",
    [
        (dict(patch_mixer_depth=0), (8, 12), 0.5),  # naive masking, non-square latent
        (dict(patch_mixer_width=64), (16, 8), 0.3),  # mixer at the backbone width: Identity maps
        (dict(moe_every=0, attn_mult=(1.0, 1.0)), (8, 8), 0.0),  # dense only
    ],
)
def test_variants_agree_with_flop_counter(overrides, latent_hw, mask_ratio):
    """Small variants run on real CPU tensors too, so meta-device counting is not all the tests see."""
    small = dict(caption_dim=48, width=64, depth=4, head_dim=16, patch_mixer_depth=2, patch_mixer_width=32)
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=latent_hw, **{**small, **overrides})
    measured = measured_train_flops(net, latent_hw, 9, mask_ratio, "cpu")
    ours = train_flops_per_sample(net, latent_size=latent_hw, caption_len=9, mask_ratio=mask_ratio)
    # the first layers' input gradients are never computed (inputs need no grad): a small, bounded gap
    assert 0 <= ours - measured < 0.03 * measured, (ours, measured)


def test_masking_cuts_backbone_not_mixer():
    with torch.device("meta"):
        net = create_dit("MicroDiT_XL_2", latent_size=32)
    full = forward_flops_breakdown(net, 32, 77, 0.0)
    masked = forward_flops_breakdown(net, 32, 77, 0.75)
    assert masked["mixer"] < full["mixer"]  # only the map back to backbone width runs on fewer tokens
    assert masked["mixer"] > 0.95 * full["mixer"]
    assert 0.2 < masked["backbone"] / full["backbone"] < 0.3
    assert masked["caption"] == full["caption"]
    assert masked["final"] < full["final"]  # the final layer runs on kept tokens only


def test_sampling_flops_count_network_evaluations():
    with torch.device("meta"):
        net = create_dit("MicroDiT_Tiny_2", latent_size=32)
    one = forward_flops(net, 32, 77, 0.0)
    assert sample_flops_per_image(net, 32, 77, steps=30, sampler="heun", guidance=True) == 2 * 59 * one
    assert sample_flops_per_image(net, 32, 77, steps=30, sampler="euler", guidance=False) == 30 * one
    assert network_evals(10, "stochastic") == 19 and network_evals(10, "dpmpp_2m") == 10
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        network_evals(10, "plms")
    with pytest.raises(ValueError, match="mask_ratio"):
        train_flops_per_sample(net, 32, 77, mask_ratio=1.0)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        forward_flops(net, latent_size=(31, 32), caption_len=77)
