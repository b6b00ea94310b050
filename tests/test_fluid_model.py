"""The Fluid network: its diffusion head, raster causality, the mask token, patches, presets and their sizes."""
from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from micro_diffusion.models.attention import fused_attention
from micro_diffusion.models.fluid import FLUID_PRESETS, DiffusionHead, Fluid, FluidConfig, create_fluid
from micro_diffusion.models.fluid_head import step_features
from micro_diffusion.models.patches import unpatchify

# Fluid's Table: parameters of the six sizes, as the paper reports them (T5-XXL captions, 4096 wide)
PAPER_PARAMS = {"Fluid_166M": 166e6, "Fluid_369M": 369e6, "Fluid_665M": 665e6, "Fluid_1B": 1.1e9,
                "Fluid_3B": 3.1e9, "Fluid_10B": 10.5e9}


def mar_head_shapes(d: int, cond: int, width: int, depth: int) -> dict[str, tuple[int, ...]]:
    """The state dict of MAR's SimpleMLPAdaLN(d, width, 2d, cond, depth), written out from models/diffloss.py."""
    shapes = {
        "time_embed.mlp.0.weight": (width, 256), "time_embed.mlp.0.bias": (width,),
        "time_embed.mlp.2.weight": (width, width), "time_embed.mlp.2.bias": (width,),
        "cond_embed.weight": (width, cond), "cond_embed.bias": (width,),
        "input_proj.weight": (width, d), "input_proj.bias": (width,),
    }
    for i in range(depth):
        shapes.update({
            f"res_blocks.{i}.in_ln.weight": (width,), f"res_blocks.{i}.in_ln.bias": (width,),
            f"res_blocks.{i}.mlp.0.weight": (width, width), f"res_blocks.{i}.mlp.0.bias": (width,),
            f"res_blocks.{i}.mlp.2.weight": (width, width), f"res_blocks.{i}.mlp.2.bias": (width,),
            f"res_blocks.{i}.adaLN_modulation.1.weight": (3 * width, width),
            f"res_blocks.{i}.adaLN_modulation.1.bias": (3 * width,),
        })
    shapes.update({
        "final_layer.linear.weight": (2 * d, width), "final_layer.linear.bias": (2 * d,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "final_layer.adaLN_modulation.1.bias": (2 * width,),
    })
    return shapes


def test_head_starts_at_zero_output():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=16, cond_dim=1024, width=1024, depth=3)
    x, t, c = torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randn(5, 1024)
    out = head(x, t, c)
    assert out.shape == (5, 32)
    assert torch.equal(out, torch.zeros(5, 32))  # zero adaLN and output layers: epsilon 0, variance values 0
    # everything else is live: a non-zero output layer gives an output that depends on x, t and c
    torch.nn.init.normal_(head.final_layer.linear.weight, std=0.1)
    for b in head.res_blocks:
        torch.nn.init.normal_(b.adaLN_modulation[-1].weight, std=0.1)
    out = head(x, t, c)
    assert not torch.allclose(out, head(x + 1, t, c)) and not torch.allclose(out, head(x, (t + 7) % 1000, c))
    assert not torch.allclose(out, head(x, t, c + 1))


@pytest.mark.parametrize("d, cond, width, depth", [(16, 1024, 1024, 3), (12, 40, 24, 1)])
def test_head_state_dict_is_mars(d, cond, width, depth):
    with torch.device("meta"):
        head = DiffusionHead(token_dim=d, cond_dim=cond, width=width, depth=depth)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert ours == mar_head_shapes(d, cond, width, depth)
    assert list(ours) == list(mar_head_shapes(d, cond, width, depth))  # registration order too


def test_head_init_as_mar():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=16, cond_dim=64, width=256, depth=2)
    for lin in head.time_embed.mlp[0], head.time_embed.mlp[2]:
        assert 0.015 < lin.weight.std().item() < 0.025
    bound = (6 / (256 + 256)) ** 0.5  # xavier-uniform of a 256 x 256 linear
    w = head.res_blocks[0].mlp[0].weight
    assert w.abs().max().item() <= bound and w.std().item() > 0.5 * bound / 3**0.5
    assert all(torch.count_nonzero(m.bias) == 0 for m in head.modules() if isinstance(m, torch.nn.Linear))


def test_step_features_cosines_first():
    f = step_features(torch.tensor([0, 999]))
    assert f.shape == (2, 256)
    assert torch.equal(f[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert torch.allclose(f[1, 0], torch.cos(torch.tensor(999.0)))
    assert torch.allclose(f[1, 128], torch.sin(torch.tensor(999.0)))
    assert torch.allclose(f[1, 127], torch.cos(torch.tensor(999.0 * 10000 ** (-127 / 128))))


def _micro(order: str, seed: int = 0, **kw) -> Fluid:
    torch.manual_seed(seed)
    return create_fluid("Fluid_Micro", latent_size=8, caption_dim=24, order=order, **kw).eval()


@pytest.mark.parametrize("fused", [False, True])
def test_raster_order_is_causal(fused):
    net = _micro("raster")
    tokens, caption = torch.randn(2, 16, 16), torch.randn(2, 5, 24)
    with torch.no_grad(), (fused_attention() if fused else nullcontext()):
        z = net(tokens, None, caption)  # (2, 16, 32)
        for i in (0, 5, 15):
            changed = tokens.clone()
            changed[:, i:] = torch.randn_like(changed[:, i:])  # tokens >= i change
            z2 = net(changed, None, caption)
            assert torch.allclose(z[:, : i + 1], z2[:, : i + 1], atol=1e-6)  # positions <= i see tokens < i only
            if i < 15:
                assert not torch.allclose(z[:, i + 1:], z2[:, i + 1:], atol=1e-3)  # later positions do see them


def test_random_order_reads_known_tokens_only():
    net = _micro("random")
    tokens, caption = torch.randn(2, 16, 16), torch.randn(2, 5, 24)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 4, 9, 15]], mask[1, [0, 2, 3]] = True, True
    with torch.no_grad():
        z = net(tokens, mask, caption)
        noisy = torch.where(mask[..., None], torch.randn_like(tokens) * 100, tokens)  # unknown inputs replaced
        assert torch.equal(z, net(noisy, mask, caption))
        known = tokens.clone()
        known[:, 12] += 1.0  # a known token (not masked in either sample): bidirectional, every output moves
        z2 = net(known, mask, caption)
        assert (z2 - z).abs().amax(dim=-1).min() > 1e-4
        assert not torch.allclose(z, net(tokens, mask, caption + 1))  # the text enters through cross-attention
    with pytest.raises(ValueError, match="mask"):
        net(tokens, None, caption)


def test_order_owns_its_learned_token():
    assert {"mask_token"} <= set(dict(_micro("random").named_parameters()))
    assert "start_token" not in dict(_micro("random").named_parameters())
    assert "start_token" in dict(_micro("raster").named_parameters())
    assert "mask_token" not in dict(_micro("raster").named_parameters())
    net = _micro("raster")
    assert set(Fluid.block_types) == {type(b) for b in [*net.aligner, *net.blocks]}


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (6, 4)])
def test_patchify_inverts_unpatchify(hw):
    net = _micro("random")
    latents = torch.randn(3, 4, *hw)
    tokens = net.patchify(latents)
    grid = net.grid(hw)
    assert tokens.shape == (3, grid[0] * grid[1], net.token_dim)
    assert torch.equal(unpatchify(tokens, grid, 2, 4), latents)
    assert torch.equal(net.patchify(unpatchify(tokens, grid, 2, 4)), tokens)
    # row-major: token 1 is the patch right of the top-left one, its values (p, p, C) channel-last
    assert torch.equal(tokens[:, 1], latents[:, :, 0:2, 2:4].permute(0, 2, 3, 1).reshape(3, -1))


def test_other_latent_sizes_decode():
    net = _micro("random")
    with torch.no_grad():
        assert net(torch.randn(1, 36, 16), torch.ones(1, 36, dtype=torch.bool), torch.randn(1, 3, 24),
                   grid=(6, 6)).shape == (1, 36, 32)  # not the configured 4 x 4
        text = net.encode_text(torch.randn(1, 3, 24))
        z = net.decode(torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool), text, grid=(3, 4))
        assert z.shape == (1, 12, 32)
        with pytest.raises(ValueError, match="12 tokens"):
            net.decode(torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool), text)
        with pytest.raises(ValueError, match=r"patch grid \(3, 4\)"):
            net.decode(torch.randn(1, 16, 16), torch.ones(1, 16, dtype=torch.bool), text, grid=(3, 4))


def test_preset_errors_name_the_offender():
    with pytest.raises(KeyError, match="Fluid_2B.*Fluid_166M.*Fluid_Micro"):
        create_fluid("Fluid_2B")
    with pytest.raises(TypeError, match="head_dim"):
        create_fluid("Fluid_Micro", head_dim=64)
    with pytest.raises(ValueError, match="'spiral'"):
        create_fluid("Fluid_Micro", order="spiral")


def test_config_is_json_ready_and_frozen():
    net = create_fluid("Fluid_Micro", latent_size=[8, 12], caption_dim=24, order="raster")
    d = net.cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["latent_size"] == [8, 12] and d["order"] == "raster"
    assert FluidConfig(**{**d, "latent_size": tuple(d["latent_size"])}) == net.cfg
    with pytest.raises(AttributeError):
        net.cfg.width = 64  # frozen: a built network's config cannot drift from its modules
    assert net.token_dim == 16 and net.head.cond_dim == net.cfg.width


def count(name: str, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_fluid(name, **kw).parameters())


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_preset_sizes_near_the_papers(name):
    """Within 7% of the paper's count (CLIP-H 1024-wide captions instead of T5's 4096; head 3 x 1024)."""
    ours = count(name)
    assert abs(ours / PAPER_PARAMS[name] - 1) < 0.07, (name, ours)
    assert count(name, caption_dim=4096) - ours == 3072 * FLUID_PRESETS[name]().width  # the caption projection


def test_tiny_presets_are_small():
    assert count("Fluid_Micro") < count("Fluid_Tiny") < 5e6
