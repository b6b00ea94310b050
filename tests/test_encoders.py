"""Encoders: a tiny saved VAE loaded by path, the packaged MiniLM, and an open_clip text tower built offline."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

from micro_diffusion.encoders import load_text_encoder, load_vae, minilm_path


def tiny_vae(scaling_factor: float = 0.37) -> AutoencoderKL:
    """A two-level AutoencoderKL (downsample 2) that builds in milliseconds."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor)


def test_vae_round_trip_shapes_and_scaling(tmp_path):
    torch.manual_seed(0)
    raw = tiny_vae()
    raw.save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"), batch_size=2)  # batch of 5 exercises micro-batching
    assert vae.scaling_factor == pytest.approx(0.37)
    assert (vae.latent_channels, vae.downsample) == (4, 2)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.vae.training
    images = torch.rand(5, 3, 32, 24) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (5, 4, 16, 12) and latents.dtype == torch.float32
    with torch.no_grad():
        mean = raw.eval().encode(images).latent_dist.mean
    torch.testing.assert_close(latents, mean * 0.37, rtol=1e-4, atol=1e-5)
    decoded = vae.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0
    with torch.no_grad():
        expected = raw.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


def test_vae_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(str(tmp_path / "nowhere"))


def test_minilm_tokens():
    assert (minilm_path() / "config.json").is_file()
    text = load_text_encoder("minilm", caption_len=77, batch_size=2)
    assert (text.caption_len, text.dim, text.name) == (77, 384, "minilm")
    assert not any(p.requires_grad for p in text.parameters())
    emb = text.encode(["a red square on a blue field", "two green circles", "a red square on a blue field"])
    assert emb.shape == (3, 77, 384) and emb.dtype == torch.float32
    assert (emb[0] - emb[1]).abs().max() > 1e-2
    torch.testing.assert_close(emb[0], emb[2])  # batching across micro-batches must not change a caption's tokens
    short = load_text_encoder(str(minilm_path()), caption_len=16)
    assert short.encode(["a long caption " * 20]).shape == (1, 16, 384)  # truncated to caption_len


def test_open_clip_text_tower_offline(tmp_path):
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}
    (tmp_path / "md-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    text = load_text_encoder("open_clip:md-test-tiny-clip", caption_len=77)
    assert (text.caption_len, text.dim) == (77, 48)
    emb = text.encode(["a photo of a cat", "a diagram"])
    assert emb.shape == (2, 77, 48)
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    # The tokens are the final-layer-norm output: normalised per token (zero mean, unit variance before the affine).
    ln = text.model.ln_final
    torch.testing.assert_close(ln.weight, torch.ones_like(ln.weight))
    torch.testing.assert_close(emb.mean(-1), torch.zeros(2, 77), atol=1e-4, rtol=0)


def test_bad_text_spec_is_named():
    with pytest.raises(ValueError, match="no-such-encoder"):
        load_text_encoder("no-such-encoder", caption_len=77)


def test_a_hub_vae_inside_a_pipeline_repo_loads_from_its_subfolder(monkeypatch):
    seen = []

    def from_pretrained(repo, subfolder=None, **kwargs):
        seen.append((repo, subfolder))
        return tiny_vae()

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", from_pretrained)
    load_vae("stabilityai/stable-diffusion-xl-base-1.0/vae")
    load_vae("ostris/vae-kl-f8-d16")
    assert seen == [("stabilityai/stable-diffusion-xl-base-1.0", "vae"), ("ostris/vae-kl-f8-d16", None)]
