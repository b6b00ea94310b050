"""Train the small demo AutoencoderKL on generated scenes (CPU, minutes) and save it as package data.

Each batch is half the demo's single-shape scenes and half compositional scenes (micro_diffusion.data.scenes, drawn at
the same 32 px, all colour-shape pairs), so one VAE carries both; it is fully convolutional, and the summary scores its
reconstructions of 64 px held-out compositional scenes too (`compose_64px_reconstructed`, GenEval-style per task).

Reproduce the committed weights (float rounding may differ with another thread count or CPU):

    .venv/bin/python scripts/train_demo_vae.py --out micro_diffusion/demo/assets/vae

32x32 px images -> 4x8x8 latents, 64x64 -> 4x16x16 (three blocks: 4x downsampling). Loss: L1 reconstruction plus
a small KL term; no GAN or perceptual loss, as those need downloaded weights. The saved config's scaling_factor is
1/std of the latents on the demo's training scenes, so scaled latents have about unit std (EDM sigma_data ~ 1.0).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.scenes import split_prompt, split_scene
from micro_diffusion.data.shapes import HELDOUT_SEED, IMAGE_SIZE, TRAIN_SEED, draw_scene, generate, render_shape
from micro_diffusion.demo import demo_vae_path
from micro_diffusion.encoders.vae import FrozenVAE
from micro_diffusion.eval.compose import reader_trust
from micro_diffusion.eval.reader import caption_match

COMPOSE_SIZE = 64  # the compositional benchmark's image size


def build_vae() -> AutoencoderKL:
    """A 0.65M-parameter AutoencoderKL: 3 -> 4 channels, 4x downsampling, no mid-block attention (speed on CPU)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def training_batch(step: int, batch_size: int) -> torch.Tensor:
    """Fresh scenes for every step, no scene repeated: B/2 demo scenes and B/2 compositional ones (train split)."""
    half = batch_size // 2
    shapes = [render_shape(draw_scene(TRAIN_SEED, step * half + j)) for j in range(half)]
    composed = [render_scene(split_scene("train", TRAIN_SEED, step * (batch_size - half) + j, IMAGE_SIZE,
                                         include_novel=True)) for j in range(batch_size - half)]
    return to_tensor(np.stack(shapes + composed))


def learning_rate(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pixel_weights(x: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """1 on background pixels, 1 + foreground_weight on the shapes': a small share of the image, yet all the caption
    names. Background: within 0.3 (of [-1, 1]) of the border's median colour, which mild texture stays inside."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4W)
    background = border.median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    foreground = (x - background).abs().amax(dim=1, keepdim=True) > 0.3  # (B, 1, H, W)
    return 1 + foreground_weight * foreground.float()


def train(
    vae: AutoencoderKL, steps: int, batch_size: int, lr: float, kl_weight: float, foreground_weight: float
) -> None:
    """Minimise weighted mean L1 reconstruction + kl_weight * KL (summed over latent elements, averaged over images)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="train demo VAE", unit="step", mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        x = training_batch(step, batch_size)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
        l1 = ((reconstruction - x).abs() * pixel_weights(x, foreground_weight)).mean()
        kl = posterior.kl().mean()
        loss = l1 + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.0f}")


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, n: int, batch_size: int = 256) -> tuple[float, float]:
    """Mean and std of the unscaled posterior-mean latents over n training scenes."""
    images, _ = generate(n, TRAIN_SEED)
    batches = [to_tensor(images[i : i + batch_size]) for i in range(0, n, batch_size)]
    latents = torch.cat([vae.encode(x).latent_dist.mean for x in batches])  # (n, 4, H/4, W/4)
    return float(latents.mean()), float(latents.std())


@torch.no_grad()
def evaluate(vae: AutoencoderKL, n: int) -> dict[str, float]:
    """Reconstruction PSNR and reader scores on n held-out scenes (posterior mean, decoded)."""
    images, labels = generate(n, HELDOUT_SEED)
    x = to_tensor(images)
    reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((reconstruction - x) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, on the [0, 1] scale
    return {
        "heldout_images": n,
        "psnr_db": float((-10 * torch.log10(mse)).mean()),
        "reader_score_real": caption_match(images, labels),
        "reader_score_reconstructed": caption_match(reconstruction, labels),
        "compose_64px_reconstructed": {t: v["accuracy"] for t, v in reader_trust(
            [split_prompt("heldout", 0, i) for i in range(n)], COMPOSE_SIZE, FrozenVAE(vae, "demo"))["vae"]
            ["tasks"].items()},
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, set the scaling factor, save with save_pretrained, print and save the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=demo_vae_path(), help="folder for config.json + safetensors")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--foreground-weight", type=float, default=4.0, help="extra L1 weight on the shape's pixels")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weight init and the posterior samples")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared machine)")
    parser.add_argument("--stats-images", type=int, default=2048, help="training scenes used to measure latent std")
    parser.add_argument("--eval-images", type=int, default=512, help="held-out scenes for PSNR and reader scores")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = build_vae()
    start = time.perf_counter()
    train(vae, args.steps, args.batch_size, args.lr, args.kl_weight, args.foreground_weight)
    seconds = time.perf_counter() - start
    vae.eval()
    mean, std = latent_stats(vae, args.stats_images)
    vae.register_to_config(scaling_factor=1.0 / std)
    summary = {
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "latent_mean": mean,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        **evaluate(vae, args.eval_images),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.out, safe_serialization=True)
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
