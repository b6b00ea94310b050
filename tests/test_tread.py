"""TREAD token routing in MicroDiT (DiTConfig.routes): routed tokens skip a span of backbone blocks in training and
rejoin unchanged; evaluation never routes; configs round-trip; FLOPs agree with torch's counter."""
from __future__ import annotations

import json

import pytest
import torch
from test_flops import measured_train_flops

from micro_diffusion.cost.estimate import stage_flops
from micro_diffusion.cost.flops import backbone_tokens, forward_flops, train_flops_per_sample
from micro_diffusion.families import FAMILIES
from micro_diffusion.models import DiTConfig, create_dit
from micro_diffusion.models.masking import draw_keep, gather_tokens
from micro_diffusion.models.routing import draw_route, num_routed
from micro_diffusion.recipe import RecipeError, build_network, load_recipe

SMALL = dict(caption_dim=48, width=64, depth=4, head_dim=16, patch_mixer_depth=2, patch_mixer_width=32)
ROUTE = (1, 2, 0.5)  # blocks 1..2 of 4: block 1 is an MoE block, so expert choice runs on the span's tokens
LATENT, N = 8, 2  # a 4 x 4 patch grid: 16 tokens


def net_pair(**overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An unrouted and a routed network with the same weights, perturbed so that no block is near the identity."""
    torch.manual_seed(0)
    plain = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, **{**SMALL, **overrides})
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    routed = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, routes=(ROUTE,), **{**SMALL, **overrides})
    routed.load_state_dict(plain.state_dict())
    return plain, routed


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 4, LATENT, LATENT, generator=g), torch.randn(N, generator=g),
            torch.randn(N, 5, SMALL["caption_dim"], generator=g))


def span_io(net: torch.nn.Module, start: int, end: int, *args, **kwargs) -> dict[str, torch.Tensor]:
    """The backbone's hidden states entering block `start`'s span (block start-1's output), entering block `start`
    itself, and leaving the span (block end+1's input), from one forward."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:  # hooks return None: the block's arguments stay as they are
        seen[name] = value.detach()

    hooks = [
        net.blocks[start - 1].register_forward_hook(lambda m, a, out: keep("before", out)),
        net.blocks[start].register_forward_pre_hook(lambda m, a: keep("span_in", a[0])),
        net.blocks[end + 1].register_forward_pre_hook(lambda m, a: keep("after", a[0])),
    ]
    try:
        net(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def expected_draws(seed: int, tokens: int, mask_ratio: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The patch draw, then the route's draw, from one seeded generator: the order the network draws in."""
    g = torch.Generator().manual_seed(seed)
    keep = draw_keep(N, tokens, mask_ratio, torch.device("cpu"), g)[0] if mask_ratio > 0 else None
    kept = tokens if keep is None else keep.shape[1]
    return keep, draw_route(N, kept, ROUTE[2], torch.device("cpu"), g)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_routed_tokens_skip_the_span_and_the_others_run_through_it(mask_ratio):
    _, net = net_pair()
    net.train()
    start, end, _ = ROUTE
    io = span_io(net, start, end, *inputs(), mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(7))
    keep, idx = expected_draws(7, 16, mask_ratio)  # routes act on the kept tokens under deferred masking
    K = 16 if keep is None else keep.shape[1]
    assert io["before"].shape[1] == io["after"].shape[1] == K
    assert io["span_in"].shape[1] == K - num_routed(K, ROUTE[2])
    assert torch.equal(io["span_in"], gather_tokens(io["before"], idx))  # the drawn tokens enter the span
    routed = torch.ones(N, K, dtype=torch.bool).scatter_(1, idx, False)  # (N, K) True where a token skips the span
    assert torch.equal(io["after"][routed], io["before"][routed])  # back at their positions, unchanged
    # the others equal a plain run of the span's blocks on the same subset (identical inputs, so the MoE's top-k
    # sees identical router logits: no near-tie can differ between the two)
    with torch.no_grad():
        c = net.noise_embed(inputs()[1]) + net.caption_embed(inputs()[2])[1]
        y = net.caption_embed(inputs()[2])[0]
        h = io["span_in"]
        for block in net.blocks[start:end + 1]:
            h = block(h, c, y)
    assert torch.equal(gather_tokens(io["after"], idx), h)
    assert not torch.allclose(gather_tokens(io["before"], idx), h)  # the span did change them


def test_gradients_reach_every_token():
    _, net = net_pair()
    net.train()
    x, c_noise, captions = inputs()
    x.requires_grad_(True)
    out = net(x, c_noise, captions, generator=torch.Generator().manual_seed(3))
    out.sample.square().mean().backward()  # the loss covers every output position: nothing was dropped
    assert out.mask is None and bool((out.sample != 0).all())
    patch_grad = x.grad.abs().unflatten(2, (4, 2)).unflatten(4, (4, 2)).sum(dim=(1, 3, 5))  # (N, 4, 4) per patch
    assert bool((patch_grad > 0).all())
    for block in net.blocks[ROUTE[0]:ROUTE[1] + 1]:
        assert block.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_eval_mode_and_no_routes_are_bit_identical(mask_ratio):
    plain, routed = net_pair()
    x, c_noise, captions = inputs()
    outs = []
    for net, training in ((plain, False), (routed, False), (plain, True)):
        net.train(training)
        outs.append(net(x, c_noise, captions, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(5)))
    for out in outs[1:]:
        assert torch.equal(out.sample, outs[0].sample)
        assert (out.mask is None and outs[0].mask is None) or torch.equal(out.mask, outs[0].mask)
    routed.train()  # the route draws after the patch draw: the mask is the one an unrouted network draws
    out = routed(x, c_noise, captions, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(5))
    assert (out.mask is None and mask_ratio == 0) or torch.equal(out.mask, outs[0].mask)
    assert not torch.equal(out.sample, outs[0].sample)


def test_validation_loss_never_routes():
    plain, routed = net_pair()
    x0, _, captions = inputs()
    d = {"mask_ratio": 0.0, "p_mean": -0.6, "p_std": 1.2, "sigma_data": 0.5}
    losses = []
    for net in (plain, routed):
        net.train()
        losses.append(FAMILIES["dit"].val_loss(net, x0, captions, d, torch.Generator().manual_seed(2), None))
        assert net.training  # the mode is restored
    assert torch.equal(losses[0], losses[1])


def test_draw_is_seeded():
    _, net = net_pair()
    net.train()
    x, c_noise, captions = inputs()

    def run(seed: int) -> torch.Tensor:
        return net(x, c_noise, captions, mask_ratio=0.5, generator=torch.Generator().manual_seed(seed)).sample

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))
    a, b = (draw_route(N, 64, 0.5, torch.device("cpu"), torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.equal(a, b)
    assert torch.equal(a, draw_route(N, 64, 0.5, torch.device("cpu"), torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("tokens, ratio", [(16, 0.5), (10, 0.3), (10, 0.7), (7, 0.1), (256, 0.25)])
def test_routed_count_is_int_t_ratio(tokens, ratio):
    idx = draw_route(3, tokens, ratio, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert idx.shape == (3, tokens - int(tokens * ratio))
    assert bool((idx.diff(dim=1) > 0).all())  # distinct, ascending


def test_state_dicts_match_and_load_both_ways():
    torch.manual_seed(0)
    plain = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, **SMALL)
    torch.manual_seed(0)
    routed = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, routes=((0, 1, 0.5), (2, 3, 0.25)), **SMALL)
    a, b = plain.state_dict(), routed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    plain.load_state_dict(b)  # strict, both ways: routes add no parameters
    routed.load_state_dict(a)


def test_config_round_trip_keeps_tuples():
    net = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, routes=[[0, 1, 0.5], [3, 3, 0.25]], **SMALL)
    assert net.cfg.routes == ((0, 1, 0.5), (3, 3, 0.25))
    network = json.loads(json.dumps(net.cfg.to_dict()))  # what an export's config.json holds
    assert network["routes"] == [[0, 1, 0.5], [3, 3, 0.25]]
    again = create_dit("MicroDiT_Tiny_2", **network)
    assert again.cfg == net.cfg and all(isinstance(r, tuple) for r in again.cfg.routes)


def test_recipe_overrides_take_routes():
    cfg = load_recipe("recipes/demo_masked.yaml", ["model.overrides.routes=[[1, 2, 0.5]]"])
    with torch.device("meta"):
        assert build_network(cfg).cfg.routes == ((1, 2, 0.5),)
    with pytest.raises(RecipeError, match=r"model \(preset and overrides\): routes\[0\] \[1, 9, 0.5\]"):
        load_recipe("recipes/demo_masked.yaml", ["model.overrides.routes=[[1, 9, 0.5]]"])


@pytest.mark.parametrize("routes, match", [
    (((3, 1, 0.5),), r"routes\[0\] \(3, 1, 0.5\): needs 0 <= start <= end < depth \(4\)"),
    (((0, 1, 0.5), (2, 4, 0.5)), r"routes\[1\] \(2, 4, 0.5\): needs 0 <= start <= end < depth \(4\)"),
    (((-1, 1, 0.5),), r"routes\[0\] \(-1, 1, 0.5\): needs 0 <= start"),
    (((0, 1, 0.0),), r"routes\[0\] \(0, 1, 0.0\): ratio must lie in \(0, 1\)"),
    (((0, 1, 1),), r"routes\[0\] \(0, 1, 1\): ratio must lie in \(0, 1\)"),
    (((2, 3, 0.5), (0, 2, 0.5)), r"routes\[1\] \(0, 2, 0.5\) and routes\[0\] \(2, 3, 0.5\) overlap \(block 2\)"),
    (((0, 1),), r"routes\[0\] \(0, 1\): expected \(start, end, ratio\)"),
    (((0.0, 1, 0.5),), r"routes\[0\] \(0.0, 1, 0.5\): start and end must be integer block indices"),
    (((0, 1, "half"),), r"routes\[0\] \(0, 1, 'half'\): ratio must be a number"),
    ((0, 1, 0.5), r"routes\[0\] 0: expected \(start, end, ratio\)"),
])
def test_bad_routes_name_the_route(routes, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(depth=4, routes=routes)


def test_flops_follow_routes_in_training_only():
    with torch.device("meta"):
        net = create_dit("MicroDiT_XL_2", latent_size=32, routes=((2, 25, 0.5),))
    assert backbone_tokens(net, 64, training=True) == [64, 64] + [32] * 24 + [64, 64]
    assert backbone_tokens(net, 64, training=False) == [64] * 28
    assert forward_flops(net, 32, 77, training=True) < forward_flops(net, 32, 77)  # sampling counts every token


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_xl_flops_agree_with_flop_counter(mask_ratio):
    with torch.device("meta"):
        net = create_dit("MicroDiT_XL_2", latent_size=32, routes=((2, 25, 0.5),))
    net.train()
    measured = measured_train_flops(net, (32, 32), 77, mask_ratio, "meta")
    ours = train_flops_per_sample(net, latent_size=32, caption_len=77, mask_ratio=mask_ratio)
    assert abs(ours - measured) / measured < 0.02, (ours / 1e9, measured / 1e9)


@pytest.mark.parametrize("routes, latent_hw, mask_ratio", [
    (((1, 2, 0.5),), (8, 8), 0.0),
    (((0, 1, 0.3), (3, 3, 0.6)), (8, 12), 0.5),  # two routes, a non-square latent, deferred masking
])
def test_small_flops_agree_with_flop_counter(routes, latent_hw, mask_ratio):
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=latent_hw, routes=routes, **SMALL)
    net.train()
    measured = measured_train_flops(net, latent_hw, 9, mask_ratio, "cpu")
    ours = train_flops_per_sample(net, latent_size=latent_hw, caption_len=9, mask_ratio=mask_ratio)
    # as test_flops: the first layers' input gradients are never computed (inputs need no grad), a small bounded gap
    assert 0 <= ours - measured < 0.03 * measured, (ours, measured)


def test_distilling_a_routed_network_is_refused():
    with pytest.raises(RecipeError, match=r"^distill with model.overrides.routes \[\[1, 2, 0.5\]\]: .* JVP"):
        load_recipe("recipes/demo_distill.yaml", ["model.overrides.routes=[[1, 2, 0.5]]"])
    assert load_recipe("recipes/demo_distill.yaml", ["model.overrides.routes=[]"])["distill"] is not None


@pytest.mark.parametrize("res", [256, 512])
def test_tread_stage_recipes_route_the_xl_backbone_in_place_of_masking(res):
    tread, masked = (load_recipe(f"recipes/res{res}_{kind}.yaml") for kind in ("tread", "masked"))
    with torch.device("meta"):
        net = build_network(tread)
    assert net.cfg.routes == ((2, 24, 0.5),) and net.cfg.patch_mixer_depth == 0 and len(net.blocks) == 28
    assert tread["diffusion"]["mask_ratio"] == 0.0 and masked["diffusion"]["mask_ratio"] == 0.75
    same = ("optimizer", "scheduler", "algorithms", "train", "data")
    assert {k: tread[k] for k in same} == {k: masked[k] for k in same}
    # the chain's own finetunes: the paper's, on the network without a patch-mixer, so they load its weights
    finetune = load_recipe(f"recipes/res{res}_tread_finetune.yaml")
    assert finetune["init_from"] == f"res{res}_tread" and finetune["diffusion"]["mask_ratio"] == 0.0
    with torch.device("meta"):
        tuned = build_network(finetune)
    assert {k: v.shape for k, v in tuned.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    if res == 512:  # stage 3 starts from the chain's 256 px finetune
        assert tread["init_from"] == "res256_tread_finetune"
    per_sample = {name: stage_flops(cfg, 1, 1)[0] for name, cfg in (
        ("tread", tread), ("masked", masked), ("dense", load_recipe(f"recipes/res{res}_tread.yaml",
                                                                     ["model.overrides.routes=[]"])))}
    # half the tokens skip 23 of 28 blocks: about 0.41 of the dense backbone's FLOPs saved, less than masking saves
    assert 1 - per_sample["tread"] / per_sample["dense"] == pytest.approx(0.5 * 23 / 28, rel=0.1)
    assert per_sample["masked"] < per_sample["tread"] < per_sample["dense"]
