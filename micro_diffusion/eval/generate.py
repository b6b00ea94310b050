"""Text-to-image generation from an exported model: captions -> latents (sampler + guidance) -> VAE -> PIL images."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..diffusion.sampling import guided_net_denoiser, sample
from ..export import load_exported


@dataclass
class SampleSettings:
    """Everything that decides a generated image besides its caption and index."""

    steps: int = 30
    guidance: float = 5.0
    sampler: str = "heun"
    seed: int = 0
    guidance_interval: tuple[float, float] | None = None
    use_ema: bool | None = None  # None: EMA weights when the export has them

    def to_dict(self) -> dict:
        """Plain, JSON-ready copy."""
        return asdict(self)


def image_seed(seed: int, index: int) -> int:
    """A per-image seed from (run seed, image index): images do not depend on batching, sharding or resumption."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) images in [-1, 1] -> PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equal-size images row-major into one image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


class Generator:
    """An exported network with the VAE and text encoder its config names, ready to render captions."""

    def __init__(self, model_dir: str | Path, settings: SampleSettings, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from ..encoders import load_text_encoder, load_vae

        self.settings, self.device = settings, torch.device(device)
        self.net, self.config, null = load_exported(model_dir, settings.use_ema, self.device)
        enc = self.config["encoders"]
        self.text = load_text_encoder(enc["text_encoder"], device=self.device, dtype=dtype,
                                      caption_len=enc["caption_len"])
        self.vae = load_vae(enc["vae"], device=self.device, dtype=dtype)
        self.null = torch.as_tensor(null.astype(np.float32), device=self.device)  # (L, D)
        if self.null.shape != (self.text.caption_len, self.text.dim):
            raise ValueError(f"null caption {tuple(self.null.shape)} does not match text encoder "
                             f"{enc['text_encoder']} ({self.text.caption_len}, {self.text.dim})")
        size = self.config["network"]["latent_size"]
        self.latent_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.sigma_data = float(self.config.get("sigma_data", 0.9))

    @torch.no_grad()
    def latents(self, captions: list[str], indices: list[int]) -> torch.Tensor:
        """Sampled latents (N, C, h, w) for captions, noise seeded per (seed, index)."""
        s = self.settings
        c = self.net.cfg.in_channels
        noise = torch.stack([torch.randn((c, *self.latent_hw), generator=torch.Generator().manual_seed(
            image_seed(s.seed, i))) for i in indices]).to(self.device)  # (N, C, h, w), drawn on CPU: same on any device
        emb = self.text.encode(captions).to(self.device)  # (N, L, D)
        denoiser = guided_net_denoiser(self.net, emb, self.null, s.guidance, s.guidance_interval, self.sigma_data)
        churn = torch.Generator(device=self.device).manual_seed(image_seed(s.seed, indices[0]))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            return sample(denoiser, noise, steps=s.steps, sampler=s.sampler, generator=churn)

    def __call__(self, captions: list[str], indices: list[int]) -> list[Image.Image]:
        """Render captions (one image each) to PIL images."""
        return to_pil(self.vae.decode(self.latents(captions, indices)))


def save_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name, then rename: an interrupted run never leaves a half-written image."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    image.save(tmp)
    tmp.replace(path)
