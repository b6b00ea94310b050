"""SPRINT in MicroDiT (DiTConfig.sprint_encoder_depth / sprint_decoder_depth): dense encoder, sparse middle on the kept
tokens, concat+Linear fusion, dense decoder; configs round-trip and are checked; FLOPs agree with torch's counter."""
from __future__ import annotations

import json

import pytest
import torch
from test_flops import measured_train_flops

from micro_diffusion.cost.flops import backbone_tokens, forward_flops_breakdown, train_flops_per_sample
from micro_diffusion.diffusion.edm import EDMPrecond, loss_weight
from micro_diffusion.models import DiTConfig, create_dit
from micro_diffusion.models.masking import draw_keep, gather_tokens, num_kept
from micro_diffusion.recipe import RecipeError, build_network, load_recipe

SMALL = dict(caption_dim=48, width=64, depth=4, head_dim=16, patch_mixer_depth=0)
SPRINT = dict(sprint_encoder_depth=1, sprint_decoder_depth=1)  # blocks 0 | 1, 2 | 3: block 1 (MoE) is sparse
LATENT, N, T = 8, 2, 16  # a 4 x 4 patch grid: 16 tokens


def sprint_net(**overrides) -> torch.nn.Module:
    """A small SPRINT network, perturbed so that no block is near the identity and the output is not zero."""
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, **{**SMALL, **SPRINT, **overrides})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 4, LATENT, LATENT, generator=g), torch.randn(N, generator=g),
            torch.randn(N, 5, SMALL["caption_dim"], generator=g))


def block_inputs(net: torch.nn.Module, *args, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """Every backbone block's image-token input and output from one forward, and the forward's output."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    hooks = [h for b in net.blocks for h in (
        b.register_forward_pre_hook(lambda m, a: ins.append(a[0].detach())),
        b.register_forward_hook(lambda m, a, o: outs.append(o.detach())))]
    try:
        out = net(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs, out


def test_shapes_and_fusion_is_concat_linear():
    net = sprint_net()
    net.train()
    out = net(*inputs(), mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    assert out.sample.shape == (N, 4, LATENT, LATENT)
    assert out.mask.shape == (N, T) and bool((out.mask.sum(dim=1) == T - num_kept(T, 0.75)).all())
    assert out.keep is None  # the decoder restores every token: the EDM loss (masked_mse) covers all pixels
    assert bool((out.sample != 0).all())  # no patch predicts zeros
    lin = net.fusion.linear
    assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (64, 128) and lin.bias.shape == (64,)
    names = dict(net.named_parameters())
    assert "fusion.linear.weight" in names and "fusion.fill" not in names  # the fill token is never trained
    assert "fusion.fill" in net.state_dict() and net.fusion.fill.shape == (64,)


def test_fusion_on_hand_made_tensors():
    net = sprint_net()
    fusion, D = net.fusion, 64
    g = torch.Generator().manual_seed(0)
    dense, sparse = torch.randn(N, T, D, generator=g), torch.randn(N, 4, D, generator=g)
    keep = torch.tensor([[0, 3, 7, 15], [1, 2, 8, 9]])  # (N, K)
    got = fusion(sparse, dense, keep)  # (N, T, D)
    full = fusion.fill.expand(N, T, D).clone()
    for n in range(N):
        full[n, keep[n]] = sparse[n]
    W, b = fusion.linear.weight, fusion.linear.bias  # (D, 2D): sparse channels first, then dense
    want = full @ W[:, :D].T + dense @ W[:, D:].T + b
    torch.testing.assert_close(got, want)
    # nothing dropped (the unmasked finetune): the sparse output is already at every position
    torch.testing.assert_close(fusion(dense, dense, None), dense @ (W[:, :D] + W[:, D:]).T + b)


@pytest.mark.parametrize("training", [False, True])
def test_unmasked_forward_runs_every_block_on_all_tokens(training):
    net = sprint_net()
    net.train(training)
    ins, _, out = block_inputs(net, *inputs(), mask_ratio=0.0)
    assert [h.shape[1] for h in ins] == [T] * 4
    assert out.mask is None and out.keep is None


def test_masked_middle_sees_the_kept_tokens():
    net = sprint_net()
    net.train()
    ins, outs, out = block_inputs(net, *inputs(), mask_ratio=0.75, generator=torch.Generator().manual_seed(7))
    K = num_kept(T, 0.75)
    assert [h.shape[1] for h in ins] == [T, K, K, T]  # dense encoder, sparse middle, dense decoder
    keep, mask = draw_keep(N, T, 0.75, torch.device("cpu"), torch.Generator().manual_seed(7))  # the patch draw
    assert torch.equal(out.mask, mask)
    assert torch.equal(ins[1], gather_tokens(outs[0], keep))  # the middle starts from the encoder's kept tokens
    assert torch.equal(ins[3], net.fusion(outs[2], outs[0], keep))  # the decoder starts from the fusion


def test_gradients_reach_every_output_position():
    net = sprint_net()
    net.train()
    x, c_noise, captions = inputs()
    x.requires_grad_(True)
    out = net(x, c_noise, captions, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    grad_out = torch.zeros_like(out.sample)
    for i in range(0, LATENT, 2):  # one output patch at a time: each must depend on the input
        for j in range(0, LATENT, 2):
            grad_out.zero_()
            grad_out[:, :, i:i + 2, j:j + 2] = 1
            (g,) = torch.autograd.grad(out.sample, x, grad_out, retain_graph=True)
            assert g.abs().sum() > 0, (i, j)
    out.sample.square().mean().backward()
    for name in ("fusion.linear.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight",
                 "blocks.3.attn.qkv.weight"):
        assert dict(net.named_parameters())[name].grad.abs().sum() > 0, name


def test_edm_loss_covers_every_pixel():
    net = sprint_net()
    net.train()
    x0, _, captions = inputs()
    precond = EDMPrecond(net, 0.5)
    sigma, noise = torch.tensor([0.3, 2.0]), torch.randn_like(x0)
    kw = dict(mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    loss = precond.loss_at(x0, captions, sigma, noise, **kw)  # (N,)
    kw["generator"] = torch.Generator().manual_seed(3)  # the same patch draw
    denoised, keep = precond.denoise(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, captions, **kw)
    assert keep is None  # so masked_mse averages over every pixel, the dropped patches' included
    torch.testing.assert_close(loss, loss_weight(sigma, 0.5) * (denoised - x0).square().mean(dim=(1, 2, 3)))


def test_recipe_overrides_take_sprint():
    sprint = ["model.overrides.patch_mixer_depth=0", "model.overrides.sprint_encoder_depth=1",
              "model.overrides.sprint_decoder_depth=1"]
    cfg = load_recipe("recipes/demo_masked.yaml", sprint)
    with torch.device("meta"):
        assert build_network(cfg).fusion is not None
    with pytest.raises(RecipeError, match=r"needs patch_mixer_depth 0, got 1"):
        load_recipe("recipes/demo_masked.yaml", sprint[1:])


def test_config_round_trip_and_weights_load():
    net = sprint_net()
    network = json.loads(json.dumps(net.cfg.to_dict()))  # what an export's config.json holds
    assert network["sprint_encoder_depth"] == 1 and network["sprint_fusion"] == "concat_linear"
    again = create_dit("MicroDiT_Tiny_2", **network)
    assert again.cfg == net.cfg and again.cfg.sprint
    again.load_state_dict(net.state_dict())  # strict
    for a, b in zip(again.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_without_sprint_nothing_is_added():
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, **SMALL)
    assert net.fusion is None and not net.cfg.sprint
    assert not any(k.startswith("fusion") for k in net.state_dict())


@pytest.mark.parametrize("overrides, match", [
    (dict(sprint_fusion="add"), r"sprint_fusion 'add' is not built; known: concat_linear"),
    (dict(patch_mixer_depth=2), r"needs patch_mixer_depth 0, got 2"),
    (dict(routes=((1, 2, 0.5),)), r"SPRINT .* does not combine with routes"),
    (dict(sprint_encoder_depth=2, sprint_decoder_depth=2), r"sprint_encoder_depth \+ sprint_decoder_depth "
                                                          r"\(2 \+ 2\) must be < depth \(4\)"),
    (dict(sprint_encoder_depth=-1), r"sprint_encoder_depth must be an integer >= 0, got -1"),
    (dict(sprint_decoder_depth=1.5), r"sprint_decoder_depth must be an integer >= 0, got 1.5"),
])
def test_bad_configs_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**SMALL, **SPRINT, **overrides})


def test_fusion_checked_when_off_too():
    with pytest.raises(ValueError, match="sprint_fusion 'sum'"):
        DiTConfig(sprint_fusion="sum")


def test_flops_count_dense_blocks_on_all_tokens():
    with torch.device("meta"):
        net = create_dit("MicroDiT_XL_2", latent_size=32, patch_mixer_depth=0, **{**SPRINT, "sprint_decoder_depth": 2})
    assert backbone_tokens(net, 64, training=True, all_tokens=256) == [256] + [64] * 25 + [256, 256]
    parts = forward_flops_breakdown(net, 32, 77, 0.75)
    assert parts["mixer"] == 0 and parts["fusion"] == 2 * 256 * 2048 * 1024
    assert parts["final"] == forward_flops_breakdown(net, 32, 77, 0.0)["final"]  # every token, masked or not


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_xl_flops_agree_with_flop_counter(mask_ratio):
    with torch.device("meta"):  # the paper's SPRINT split of 28 blocks: 2 dense, 24 sparse, 2 dense
        net = create_dit("MicroDiT_XL_2", latent_size=32, patch_mixer_depth=0, sprint_encoder_depth=2,
                         sprint_decoder_depth=2)
    net.train()
    measured = measured_train_flops(net, (32, 32), 77, mask_ratio, "meta")
    ours = train_flops_per_sample(net, latent_size=32, caption_len=77, mask_ratio=mask_ratio)
    assert abs(ours - measured) / measured < 0.02, (ours / 1e9, measured / 1e9)


@pytest.mark.parametrize("latent_hw, mask_ratio", [((8, 8), 0.0), ((8, 12), 0.75)])
def test_small_flops_agree_with_flop_counter(latent_hw, mask_ratio):
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=latent_hw, **SMALL, **SPRINT)
    net.train()
    measured = measured_train_flops(net, latent_hw, 9, mask_ratio, "cpu")
    ours = train_flops_per_sample(net, latent_size=latent_hw, caption_len=9, mask_ratio=mask_ratio)
    # as test_flops: the first layers' input gradients are never computed (inputs need no grad), a small bounded gap
    assert 0 <= ours - measured < 0.03 * measured, (ours, measured)
