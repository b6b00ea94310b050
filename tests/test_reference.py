"""Importing the paper's released weights: the layout fixture, the converter's errors, one block's math, parity.

tests/data/reference_layout.json holds the names and shapes of the released network's state dict for Tiny and XL
with 4 and 16 channels, dumped from the public reference code by scripts/reference_layout.py. The parity test runs
the reference itself and is skipped unless MICRO_DIFFUSION_REFERENCE names a checkout of it.
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from micro_diffusion import load_exported
from micro_diffusion.cli import main
from micro_diffusion.models import create_dit
from micro_diffusion.models.blocks import DiTBlock
from micro_diffusion.reference import (
    ReferenceImportError,
    convert_state,
    import_reference,
    infer_config,
    infer_pos_base_grid,
    sha256,
    to_reference,
)

FIXTURE = json.loads((Path(__file__).parent / "data" / "reference_layout.json").read_text())
SMALL = dict(width=64, depth=4, head_dim=16, patch_mixer_depth=2, patch_mixer_width=48)  # a Tiny_2 shrunk
REFERENCE = os.environ.get("MICRO_DIFFUSION_REFERENCE")


def meta_state(key):
    return {name: torch.empty(shape, device="meta") for name, shape in FIXTURE["layouts"][key]}


def meta_net(dit, where):
    preset, kwargs = infer_config(dit, where)
    with torch.device("meta"):
        return create_dit(preset, **kwargs)


@pytest.mark.parametrize("key", list(FIXTURE["layouts"]))
def test_converter_places_every_released_tensor(key):
    dit = meta_state(key)
    net = meta_net(dit, key)
    assert net.cfg.in_channels == int(key.split("/")[1]) and net.cfg.latent_size == FIXTURE["latent_size"]
    state = convert_state(dit, net, key)
    assert set(state) == set(net.state_dict())
    fused = sum(name.endswith(".mlp.w1.weight") for name in dit)  # dense SwiGLUs: w1 and w2 become one w_in
    assert len(dit) == len(state) + fused + 2  # + pos_embed and mask_token, checked rather than copied


@pytest.mark.parametrize("drop", ["blocks.3.mlp.w2", "y_emb_preprocess.mlp.w2.weight", "mask_token"])
def test_a_missing_released_tensor_is_named(drop):
    dit = meta_state("MicroDiT_XL_2/4")
    net = meta_net(dit, "xl")
    del dit[drop]
    with pytest.raises(ReferenceImportError, match=rf"unfilled.*{drop}"):
        convert_state(dit, net, "xl")


def test_an_extra_tensor_is_named_and_a_wrong_shape_names_both():
    dit = meta_state("MicroDiT_Tiny_2/4")
    net = meta_net(dit, "tiny")
    with pytest.raises(ReferenceImportError, match=r"cannot be placed.*blocks\.0\.attn\.bias"):
        convert_state({**dit, "blocks.0.attn.bias": torch.empty(3, device="meta")}, net, "tiny")
    dit["blocks.0.mlp.w3.weight"] = torch.empty(512, 7, device="meta")
    with pytest.raises(ReferenceImportError, match=r"blocks\.0\.mlp\.w3\.weight.*\(512, 7\).*blocks\.0\.ffn\.w_out"):
        convert_state(dit, net, "tiny")


def small_released(tmp_path, latent=16, base=4, extra=None, prefix=""):
    """A released-layout file of a shrunk Tiny with random weights (our network in the reference's names)."""
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=latent, caption_dim=32, pos_base_grid=base, **SMALL)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    state = {prefix + k: v for k, v in to_reference(net.state_dict(), net).items()}
    path = tmp_path / "released.pt"
    torch.save({**state, **(extra or {})}, path)
    return net, path


def test_import_writes_an_export_that_loads_and_computes_the_same(tmp_path):
    net, path = small_released(tmp_path, prefix="dit.", extra={f"vae.w{i}": torch.zeros(1) for i in range(3)})
    out, summary = import_reference(str(path), tmp_path / "export", preset="MicroDiT_Tiny_2", **SMALL)
    assert summary["skipped_subtrees"] == {"vae": 3} and summary["pos_base_grid"] == 4
    loaded, config, null = load_exported(out)
    assert config["null_caption"] == "zeros" and not null.any() and null.shape == (77, 32)
    assert config["source"]["sha256"] == sha256(path) and config["encoders"]["latent_channels"] == 4
    assert config["encoders"]["text_encoder"] == "open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    g = torch.Generator().manual_seed(1)
    x, c, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, generator=g), torch.randn(2, 5, 32, generator=g)
    torch.testing.assert_close(loaded(x, c, y).sample, net.eval()(x, c, y).sample, rtol=0, atol=0)


def test_cli_import_checks_channels_and_names_unknown_subtrees(tmp_path, capsys):
    _, path = small_released(tmp_path, extra={"text_encoder.w": torch.zeros(1)})
    capsys.readouterr()
    assert main(["import-reference", str(path), "--out", str(tmp_path / "x")]) == 2  # the shrunk net is no preset
    assert "no preset has the file's sizes" in capsys.readouterr().err
    with pytest.raises(ReferenceImportError, match="--in-channels 16, but the file's patch embedding takes 4"):
        import_reference(str(path), tmp_path / "x", in_channels=16, preset="MicroDiT_Tiny_2", **SMALL)
    _, path = small_released(tmp_path, extra={"ema.w": torch.zeros(1)})
    with pytest.raises(ReferenceImportError, match=r"cannot be placed.*ema\.w"):
        import_reference(str(path), tmp_path / "x", preset="MicroDiT_Tiny_2", **SMALL)
    assert not (tmp_path / "x").exists()  # nothing written on a failed import


def test_position_interpolation_is_inferred_and_a_row_first_table_refused(tmp_path):
    for latent, base in ((16, 4), (16, 8), (64, 16)):
        net = create_dit("MicroDiT_Tiny_2", latent_size=latent, caption_dim=32, pos_base_grid=base, **SMALL)
        pe = to_reference(net.state_dict(), net)["pos_embed"]
        assert infer_pos_base_grid(pe, latent // 2, "f") == base
    net, path = small_released(tmp_path)
    state = torch.load(path, weights_only=True)
    D = state["pos_embed"].shape[-1]
    good = state["pos_embed"].clone()
    state["pos_embed"] = torch.cat([good[..., D // 2:], good[..., : D // 2]], -1)
    torch.save(state, path)
    with pytest.raises(ReferenceImportError, match="pos_embed's column step 0.00000"):  # its first half: rows
        import_reference(str(path), tmp_path / "x", preset="MicroDiT_Tiny_2", **SMALL)
    state["pos_embed"] = good.clone()
    state["pos_embed"][0, 5:] += 0.01  # a table that is no sin-cos grid at all
    torch.save(state, path)
    with pytest.raises(ReferenceImportError, match="pos_embed differs from our positions by up to"):
        import_reference(str(path), tmp_path / "x", preset="MicroDiT_Tiny_2", **SMALL)


def reference_block(b, x, c, y, heads):
    """One block as the released network computes it, written out from its definition on our block's weights."""
    def ln(t, w=None):
        return F.layer_norm(t, t.shape[-1:], w, None, 1e-6)

    def mha(q, k, v):  # q/k LayerNorm over the whole width (all heads), then heads, softmax(qk^T/sqrt(d)) v
        q, k = ln(q), ln(k)
        N, T, A = q.shape
        split = [t.reshape(N, t.shape[1], heads(A), -1).transpose(1, 2) for t in (q, k, v)]
        w = (split[0] @ split[1].transpose(-1, -2) / math.sqrt(split[0].shape[-1])).softmax(-1)
        return (w @ split[2]).transpose(1, 2).reshape(N, T, A)

    mod = F.linear(F.gelu(c, approximate="tanh"), b.adaLN[1].weight, b.adaLN[1].bias)  # (N, 6D)
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=-1))
    h = ln(x, b.norm1.weight) * (1 + sc1) + sh1
    q, k, v = F.linear(h, b.attn.qkv.weight).chunk(3, dim=-1)
    x = x + g1 * F.linear(mha(q, k, v), b.attn.proj.weight)
    h = ln(x, b.norm2.weight)
    k, v = F.linear(y, b.cross.kv.weight).chunk(2, dim=-1)
    x = x + F.linear(mha(F.linear(h, b.cross.q.weight), k, v), b.cross.proj.weight)  # cross-attention: no gate
    h = ln(x, b.norm3.weight) * (1 + sc2) + sh2
    w1, w2 = b.ffn.w_in.weight.chunk(2, dim=0)  # the released w1 (SiLU gate) and w2 (linear)
    return x + g2 * F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w2), b.ffn.w_out.weight)


def test_one_block_equals_the_released_math():
    torch.manual_seed(0)
    block = DiTBlock(dim=128, cond_dim=64, head_dim=16, attn_mult=0.6, ffn_mult=2.0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x, c, y = torch.randn(2, 9, 128), torch.randn(2, 64), torch.randn(2, 5, 128)
    assert block.attn.qkv.out_features == 3 * 96  # int(128 x 0.6) rounded up to 2 x head_dim: 6 heads of 16
    expected = reference_block(block, x, c, y, heads=lambda width: width // 16)
    torch.testing.assert_close(block(x, c, y), expected, rtol=1e-5, atol=1e-5)


def _reference_net(module, case, latent, interp):
    """The reference's own MicroDiT_Tiny_2 (1024-d captions) or a shrunk one built from its DiT class."""
    if case == "tiny":
        return module.MicroDiT_Tiny_2(input_size=latent, caption_channels=1024, pos_interp_scale=interp), {}, 1024
    depth = SMALL["depth"]
    net = module.DiT(input_size=latent, patch_size=2, in_channels=4, dim=64, depth=depth, head_dim=16,
                     caption_channels=32, pos_interp_scale=interp, qkv_multipliers=np.linspace(0.5, 1.0, depth),
                     ffn_multipliers=np.linspace(0.5, 4.0, depth), patch_mixer_depth=2, patch_mixer_dim=48,
                     patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=8, expert_capacity=2.0, experts_every_n=2)
    return net, {"preset": "MicroDiT_Tiny_2", **SMALL}, 32


@pytest.mark.skipif(not REFERENCE, reason="set MICRO_DIFFUSION_REFERENCE to a SonyResearch/micro_diffusion checkout")
@pytest.mark.parametrize("case, latent, interp", [("small", 16, 2.0), ("small", 16, 1.0), ("tiny", 64, 2.0)])
def test_parity_with_the_reference_network(tmp_path, case, latent, interp):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from reference_layout import load_reference

    torch.manual_seed(0)
    ref, options, cap = _reference_net(load_reference(REFERENCE), case, latent, interp)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02 if case == "tiny" else 0.1)  # random everywhere: its zero init would hide paths
    torch.save(ref.eval().state_dict(), tmp_path / "ref.pt")
    out, summary = import_reference(str(tmp_path / "ref.pt"), tmp_path / "export", **options)
    assert summary["pos_base_grid"] == latent // 2 / interp
    ours = load_exported(out)[0]
    g = torch.Generator().manual_seed(2)
    n = 2 if case == "tiny" else 4
    x, t, y = (torch.randn(n, 4, latent, latent, generator=g), torch.randn(n, generator=g),
               torch.randn(n, 7, cap, generator=g))
    errors = {}
    with torch.no_grad():
        for ratio in (0.0, 0.75):
            torch.manual_seed(5)  # both draw the patch mask from the global generator, the same way
            theirs = ref(x, t, y[:, None], mask_ratio=ratio)
            torch.manual_seed(5)
            mine = ours(x, t, y, mask_ratio=ratio)
            keep = torch.ones_like(mine.sample[:, :1]) if mine.keep is None else mine.keep  # (N, 1, H, W)
            if ratio:
                assert torch.equal(theirs["mask"].bool(), mine.mask)
            err = ((mine.sample - theirs["sample"]) * keep).abs().max() / (theirs["sample"] * keep).abs().max()
            errors[ratio] = err.item()
    print(f"\nparity {case} latent {latent} pos_interp_scale {interp}: max relative error on kept patches {errors}")
    assert max(errors.values()) < 1e-4


def test_hub_paths_are_parsed_before_any_download(tmp_path):
    with pytest.raises(ReferenceImportError, match="expected hf://OWNER/REPO/PATH"):
        import_reference("hf://VSehwag24/MicroDiT", tmp_path / "x")
    with pytest.raises(ReferenceImportError, match="nowhere.pt"):  # a usage error: exit 2, one line
        import_reference(str(tmp_path / "nowhere.pt"), tmp_path / "x")
