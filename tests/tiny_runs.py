"""Shared pieces of the training tests: tiny latent shards on disk and overrides that shrink a recipe to seconds."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

LAT_C, LAT_HW, CAP_L, CAP_D = 4, 8, 8, 32  # 8x8x4 latents (64 px images, 8x VAE), 8 caption tokens of 32 dims
RESOLUTION = 64
REPO = Path(__file__).resolve().parents[1]

# MoE sits in backbone block 1 of 3 (never the last), so the MoE learning-rate group is exercised.
TINY_MODEL = "{width: 64, depth: 3, head_dim: 16, patch_mixer_depth: 1, patch_mixer_width: 64}"


def write_shards(out: str | os.PathLike, n: int, prefix: str = "s", seed: int = 0, cap_d: int = CAP_D,
                 vae: str = "none", text_encoder: str = "none") -> str:
    """n latent samples per the latent-shard contract: a few smooth patterns, each tied to its caption embedding,
    in several shards with their xxh64 hashes in the index (as precompute writes them)."""
    from streaming import MDSWriter

    from micro_diffusion.data.integrity import SHARD_HASHES

    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, LAT_HW), np.linspace(-1, 1, LAT_HW), indexing="ij")
    patterns = [np.stack([np.sin(2 * xx + k), np.cos(2 * yy - k), xx * yy * k, np.sin(xx + yy + k)]) for k in range(4)]
    codes = rng.standard_normal((4, CAP_L, cap_d))
    cols = {f"latents_{RESOLUTION}": f"ndarray:float16:{LAT_C},{LAT_HW},{LAT_HW}",
            "caption_emb": f"ndarray:float16:{CAP_L},{cap_d}", "caption": "str", "id": "str"}
    with MDSWriter(out=str(out), columns=cols, size_limit=1 << 16, hashes=SHARD_HASHES) as w:
        for i in range(n):
            k = i % 4
            lat = 0.9 * patterns[k] + 0.1 * rng.standard_normal(patterns[k].shape)
            w.write({f"latents_{RESOLUTION}": lat.astype(np.float16), "caption_emb": codes[k].astype(np.float16),
                     "caption": f"pattern {k}", "id": f"{prefix}{i}"})
    np.save(Path(out) / "null_caption.npy", np.zeros((CAP_L, cap_d), np.float16))
    (Path(out) / "encoders.json").write_text(json.dumps({
        "vae": vae, "scaling_factor": 1.0, "latent_channels": LAT_C, "downsample": 8, "text_encoder": text_encoder,
        "caption_len": CAP_L, "caption_dim": cap_d, "resolutions": [RESOLUTION]}))
    return str(out)


def tiny_overrides(data_root: str | os.PathLike, runs_root: str | os.PathLike, steps: int = 6,
                   batch: int = 8, scheduler: str | None = "{name: constant}") -> list[str]:
    """Overrides that shrink a recipe to a seconds-long CPU run on shards written by write_shards."""
    return [
        f"data.root={data_root}", f"runs_root={runs_root}", f"model.overrides={TINY_MODEL}",
        f"model.caption_dim={CAP_D}", f"model.caption_len={CAP_L}", f"data.resolution={RESOLUTION}",
        "data.vae_downsample=8", "diffusion.sigma_data=0.9",
        "data.num_workers=0", f"train.global_batch={batch}", f"train.device_microbatch={batch}",
        f"train.max_duration={steps}ba", "train.progress_bar=false", "train.log_interval=100ba",
        "checkpoint.save_interval=2ba", "checkpoint.keep=-1", "data.streams=[{local: latents}]",
        "data.val_streams=[]", "eval.interval=null", "samples.interval=null", "train.device=cpu",
    ] + ([f"scheduler={scheduler}"] if scheduler else [])


MINILM_DIM = 384  # the packaged MiniLM's token width


def write_sampling_shards(root: Path) -> Path:
    """Shards whose encoders can sample: a tiny local VAE (16 px images) in root/vae and the packaged MiniLM's caption
    width, in root/latents; returns root."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    write_shards(root / "latents", 32, seed=0, cap_d=MINILM_DIM, vae=str(root / "vae"), text_encoder="minilm")
    return root


def make(*args: str) -> subprocess.CompletedProcess:
    """Run a make target of the repository as a user would; fail the test with its output if it fails."""
    out = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, f"make {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out
