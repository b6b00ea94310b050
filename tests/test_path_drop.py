"""Path-Drop Guidance (SamplingSettings.guidance_mode "path_drop"): on a SPRINT network the unconditional branch takes
the null caption and skips the sparse middle (the fusion sees the fill token everywhere); refused on other networks;
its FLOPs count the unconditional evaluations without the middle and agree with torch's counter."""
from __future__ import annotations

import json

import pytest
import torch
from test_sprint import LATENT, SMALL, inputs, sprint_net
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.cost.flops import sample_flops_per_image
from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import SamplingSettings, generate_latents, guided_denoiser
from micro_diffusion.errors import UsageError
from micro_diffusion.eval.generate import check_sampling, settings_for
from micro_diffusion.exported import CONFIG_FILE, NETWORK_FORMAT
from micro_diffusion.families import FAMILIES
from micro_diffusion.models import create_dit
from micro_diffusion.models.patches import unpatchify

PATH_DROP = SamplingSettings(steps=2, guidance=3.0, sampler="heun", guidance_mode="path_drop")


def skipped_middle(net: torch.nn.Module, x: torch.Tensor, c_noise: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """The forward written out by hand with the middle blocks skipped: encoder, fill-token fusion, decoder, final."""
    e, d = net.cfg.sprint_encoder_depth, net.cfg.sprint_decoder_depth
    h = net.patch_embed(x) + net.pos_embed(LATENT // 2, LATENT // 2, x.device, x.dtype)  # (N, T, D)
    y, pooled = net.caption_embed(caption)
    c = net.noise_embed(c_noise) + pooled
    for block in net.blocks[:e]:
        h = block(h, c, y)
    fill = net.fusion.fill.expand_as(h)  # (N, T, D)
    h = net.fusion.linear(torch.cat([fill, h], dim=-1))
    for block in net.blocks[len(net.blocks) - d:]:
        h = block(h, c, y)
    return unpatchify(net.final(h, c), (LATENT // 2, LATENT // 2), net.patch_size, 4)


@torch.no_grad()
def test_drop_path_skips_the_middle():
    net = sprint_net().eval()
    x, t, cap = inputs()
    dropped = net(x, t, cap, drop_path=True).sample
    torch.testing.assert_close(dropped, skipped_middle(net, x, t, cap))
    assert not torch.allclose(dropped, net(x, t, cap).sample)


@torch.no_grad()
def test_path_drop_unconditional_branch_is_null_caption_without_middle():
    net = sprint_net().eval()
    den = EDMPrecond(net, 0.5)
    x, _, cap = inputs()
    null = torch.randn(cap.shape[1:], generator=torch.Generator().manual_seed(5))
    sigma = torch.full((x.shape[0],), 1.3)
    scale = 3.0
    d_cond = den(x, sigma, cap)
    uncond = null.expand_as(cap)
    d_pd = den(x, sigma, uncond, drop_path=True)
    torch.testing.assert_close(guided_denoiser(den, cap, null, scale, path_drop=True)(x, sigma),
                               d_pd + scale * (d_cond - d_pd))
    d_cfg = guided_denoiser(den, cap, null, scale)(x, sigma)
    assert not torch.allclose(guided_denoiser(den, cap, null, scale, path_drop=True)(x, sigma), d_cfg)
    latents = generate_latents(den, cap, null, PATH_DROP, [0, 1], (4, LATENT, LATENT))
    assert latents.shape == x.shape and bool(torch.isfinite(latents).all())


def test_network_without_sprint_is_refused():
    net = create_dit("MicroDiT_Tiny_2", latent_size=LATENT, **SMALL)
    x, t, cap = inputs()
    with pytest.raises(ValueError, match="drop_path .*SPRINT"):
        net(x, t, cap, drop_path=True)
    with pytest.raises(UsageError, match="path_drop needs a SPRINT network"):
        FAMILIES["dit"].generate(net, cap, cap[0], PATH_DROP, [0, 1], (4, LATENT, LATENT), 0.5)
    with pytest.raises(ValueError, match="SPRINT"):
        sample_flops_per_image(net, LATENT, 5, 2, "heun", True, "path_drop")


def test_settings_check_the_mode():
    assert "guidance_mode" not in SamplingSettings().to_dict()  # records written before it stay as they were
    assert PATH_DROP.to_dict()["guidance_mode"] == "path_drop"
    with pytest.raises(UsageError, match="unknown guidance_mode 'pdg'"):
        SamplingSettings(guidance_mode="pdg")
    for sampler in ("consistency", "fluid"):
        with pytest.raises(UsageError, match=f"not the {sampler} sampler"):
            SamplingSettings(sampler=sampler, guidance_mode="path_drop")


def config(sprint: bool) -> dict:
    network = {"sprint_encoder_depth": 1 if sprint else 0, "sprint_decoder_depth": 1 if sprint else 0}
    return {"network_format": NETWORK_FORMAT, "network": network, "sampling": {"steps": 3, "guidance": 4.0,
                                                                                 "sampler": "euler"}}


def test_exports_check_the_network():
    s = settings_for(config(True), {"guidance_mode": "path_drop"})
    assert (s.steps, s.sampler, s.guidance_mode) == (3, "euler", "path_drop")
    check_sampling(config(True), s, "m")
    assert settings_for(config(True)).guidance_mode == "cfg"
    with pytest.raises(UsageError, match="^m is not a SPRINT network.*use --guidance-mode cfg$"):
        check_sampling(config(False), s, "m")


def test_cli_refuses_path_drop_on_a_network_without_sprint(tmp_path, capsys):
    from micro_diffusion.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(config(False)))
    code = main(["sample", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--prompt", "a fox",
                 "--guidance-mode", "path_drop"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a SPRINT network" in err[0]


def measured_sample_flops(net: torch.nn.Module, settings: SamplingSettings, caption_len: int) -> int:
    """FlopCounterMode's count of one image's guided sampling run."""
    cap = torch.randn(1, caption_len, SMALL["caption_dim"])
    with FlopCounterMode(display=False) as counter:
        FAMILIES["dit"].generate(net, cap, cap[0] * 0, settings, [0], (4, LATENT, LATENT), 0.5)
    return counter.get_total_flops()


def test_flops_agree_with_flop_counter_and_path_drop_costs_less():
    net, L = sprint_net(depth=6).eval(), 5
    sample_flops = FAMILIES["dit"].sample_flops
    counted = sample_flops(net, LATENT, L, PATH_DROP)
    assert abs(counted - measured_sample_flops(net, PATH_DROP, L)) <= 0.02 * counted
    cfg = SamplingSettings(steps=2, guidance=3.0, sampler="heun")
    assert counted < sample_flops(net, LATENT, L, cfg)
    assert sample_flops(net, LATENT, L, SamplingSettings(steps=2, guidance=1.0, guidance_mode="path_drop")) < counted
