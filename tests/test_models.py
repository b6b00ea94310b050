"""MicroDiT: sizes, shapes, deferred masking, MoE routing and determinism on tiny networks."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from micro_diffusion.models import create_dit, list_presets
from micro_diffusion.models.ffn import ExpertChoiceMoE

TINY = dict(caption_dim=32, width=64, depth=3, head_dim=16, patch_mixer_depth=2, patch_mixer_width=48)


def tiny(latent_size=8, **overrides):
    torch.manual_seed(0)
    return create_dit("MicroDiT_Tiny_2", latent_size=latent_size, **{**TINY, **overrides})


def inputs(n=2, h=8, w=8, caption_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c_noise = torch.randn(n, 4, h, w, generator=g), torch.randn(n, generator=g)
    return x, c_noise, torch.randn(n, 7, caption_dim, generator=g)


def randomise(net):
    """Random weights everywhere: zero-initialised gates would hide every path through the blocks."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name, expected", [("MicroDiT_XL_2", 1165.4e6), ("MicroDiT_Tiny_2", 200.7e6)])
def test_paper_parameter_counts(name, expected):
    with torch.device("meta"):
        net = create_dit(name, latent_size=32, in_channels=4, caption_dim=1024)
    assert abs(n_params(net) - expected) / expected < 0.01


def test_xl_parts_follow_the_sizing_rules():
    with torch.device("meta"):
        net = create_dit("MicroDiT_XL_2")
    moe_blocks = [i for i, b in enumerate(net.blocks) if isinstance(b.ffn, ExpertChoiceMoE)]
    assert moe_blocks == list(range(1, 27, 2))  # odd blocks, never the last: 13 of 28
    assert [i for i, b in enumerate(net.mixer) if isinstance(b.ffn, ExpertChoiceMoE)] == [1, 3, 5]
    assert [net.blocks[i].attn.qkv.out_features // 3 for i in (0, 1, 27)] == [512, 640, 1024]
    assert net.blocks[0].ffn.hidden == 512 and net.blocks[27].ffn.hidden == 2816
    assert net.blocks[1].ffn.w_in.shape == (8, 1024, 768) and net.mixer[1].ffn.w_in.shape == (8, 768, 3072)


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("latent", [8, (8, 12)])
def test_every_preset_output_shape_on_meta(name, latent):
    with torch.device("meta"):
        net = create_dit(name, latent_size=latent, caption_dim=64)
        h, w = (latent, latent) if isinstance(latent, int) else latent
        x, c, y = torch.empty(2, 4, h, w), torch.empty(2), torch.empty(2, 5, 64)
        for ratio in (0.0, 0.75):
            out = net(x, c, y, mask_ratio=ratio)
            assert out.sample.shape == (2, 4, h, w)
            assert (out.mask is None) == (ratio == 0) and (ratio == 0 or out.mask.shape == (2, h * w // 4))


@pytest.mark.parametrize("h, w", [(8, 8), (8, 12), (12, 8)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_tiny_real_forward_shapes(h, w, ratio):
    net = tiny(latent_size=(h, w))
    x, c, y = inputs(h=h, w=w)
    out = net(x, c, y, mask_ratio=ratio)
    assert out.sample.shape == x.shape and torch.isfinite(out.sample).all()
    if ratio:
        assert out.mask.dtype == torch.bool and out.mask.shape == (2, h * w // 4)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_backbone_sees_kept_tokens_and_mixer_sees_all(ratio):
    net, seen = tiny(), {}
    net.mixer[0].register_forward_hook(lambda m, a, o: seen.__setitem__("mixer", a[0].shape[1]))
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].shape[1]))
    out = net(*inputs(), mask_ratio=ratio)
    T = 16
    kept = int(T * (1 - ratio))  # truncated, as the released network
    assert seen["mixer"] == T
    assert all(seen[i] == kept for i in range(len(net.blocks)))
    assert (~out.mask).sum(dim=1).tolist() == [kept, kept]


def kept_output_grad_wrt_dropped_input(mixer_depth):
    net = randomise(tiny(patch_mixer_depth=mixer_depth))
    x, c, y = inputs()
    x.requires_grad_(True)
    out = net(x, c, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    kept = (~out.mask).float().view(2, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # (N, 1, H, W)
    (out.sample * kept).sum().backward()
    return (x.grad.abs() * (1 - kept)).sum().item()


def test_deferred_masking_lets_kept_patches_see_dropped_ones():
    assert kept_output_grad_wrt_dropped_input(mixer_depth=2) > 1e-6


def test_naive_masking_blinds_kept_patches_to_dropped_ones():
    assert kept_output_grad_wrt_dropped_input(mixer_depth=0) == 0.0


def test_moe_experts_take_exactly_their_capacity_and_router_learns():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=32, hidden=64, num_experts=4, capacity_factor=2.0)
    torch.nn.init.normal_(moe.w_in, std=0.1)
    torch.nn.init.normal_(moe.w_out, std=0.1)
    x = torch.randn(3, 20, 32)
    gates, idx = moe.route(x)
    assert idx.shape == (3, 4, moe.capacity(20)) == (3, 4, 10)
    assert all(len(set(row.tolist())) == 10 for row in idx.reshape(-1, 10))  # 10 distinct tokens per expert
    moe(x).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_moe_memory_grows_linearly_with_tokens():
    moe = ExpertChoiceMoE(dim=16, hidden=32, num_experts=4)
    torch.nn.init.normal_(moe.w_in)
    torch.nn.init.normal_(moe.w_out)
    sizes = {}
    for T in (64, 512):
        with LargestTensor() as probe:
            moe(torch.randn(2, T, 16))
        sizes[T] = probe.largest
    assert sizes[512] / sizes[64] <= 8 * 1.1  # 8x the tokens: linear, where a one-hot dispatch would give 64x


def test_same_seed_same_output_and_generator_controls_mask():
    net = randomise(tiny())
    a = net(*inputs(), mask_ratio=0.75, generator=torch.Generator().manual_seed(5))
    b = net(*inputs(), mask_ratio=0.75, generator=torch.Generator().manual_seed(5))
    c = net(*inputs(), mask_ratio=0.75, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.sample, b.sample) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_default_forward_is_unmasked_in_train_and_eval():
    net = tiny()
    for mode in (net.train, net.eval):
        mode()
        assert net(*inputs()).mask is None


def test_weights_load_at_another_resolution():
    small, large = randomise(tiny(latent_size=8)), tiny(latent_size=16)
    large.load_state_dict(small.state_dict(), strict=True)  # positions are computed, not stored
    assert not any("pos" in k for k in small.state_dict())
    out = large(*inputs(h=16, w=16))
    assert out.sample.shape == (2, 4, 16, 16)


def test_zero_initialised_output_and_gates():
    net = tiny()
    assert torch.count_nonzero(net(*inputs()).sample) == 0  # adaLN-Zero: the network starts as the zero function
    assert all(torch.count_nonzero(b.adaLN[-1].weight) == 0 for b in [*net.mixer, *net.blocks])


def test_unknown_preset_and_option_are_named():
    with pytest.raises(KeyError, match="MicroDiT_Huge"):
        create_dit("MicroDiT_Huge")
    with pytest.raises(TypeError, match="widht"):
        create_dit("MicroDiT_Tiny_2", widht=3)


@pytest.mark.gpu
def test_xformers_attention_matches_sdpa_on_cuda():
    pytest.importorskip("xformers")
    import torch.nn.functional as F

    from micro_diffusion.models.attention import attention

    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
@pytest.mark.slow
def test_compile_traces_the_whole_network_in_one_graph(ratio):
    """torch.compile (the recipes' train.compile) gets the whole forward as one graph: no break at any block."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(tiny())(*inputs(), mask_ratio=ratio)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
