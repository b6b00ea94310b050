"""Text-to-image from an exported model: captions -> embeddings -> latents (the one sampling path) -> PIL images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..diffusion.edm import EDMPrecond
from ..diffusion.sampling import SamplingSettings, generate_latents, image_seeds
from ..encoders import load_text_encoder, load_vae
from ..exported import load_exported
from ..utils.devices import torch_device
from ..utils.images import to_pil
from ..utils.sizes import as_hw


class TextToImage:
    """An exported network with the VAE and text encoder its config names, rendering captions from per-image seeds.

    Image k of a run seeded `seed` is sampled from the seed of (seed, k) (`image_seeds`), so it does not depend on
    batching, sharding or resumption, and equals image k of a training grid with the same seed and weights.
    """

    def __init__(self, model_dir: str | Path, settings: SamplingSettings, seed: int = 0, use_ema: bool | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        self.settings, self.seed, self.device = settings, seed, torch_device(str(device) if device else None)
        self.net, self.config, null = load_exported(model_dir, use_ema, self.device)
        self.denoiser = EDMPrecond(self.net, self.config["sigma_data"])
        enc = self.config["encoders"]
        self.text = load_text_encoder(enc["text_encoder"], device=self.device, dtype=dtype,
                                      caption_len=enc["caption_len"])
        self.vae = load_vae(enc["vae"], device=self.device, dtype=dtype)
        self.null = torch.as_tensor(null.astype(np.float32), device=self.device)  # (L, D)
        if self.null.shape != (self.text.caption_len, self.text.dim):
            raise ValueError(f"null caption {tuple(self.null.shape)} does not match text encoder "
                             f"{enc['text_encoder']} ({self.text.caption_len}, {self.text.dim})")
        self.latent_hw = as_hw(self.config["network"]["latent_size"])

    @property
    def resolution(self) -> int:
        """Side of the generated images in pixels (latent side x the VAE's downsampling)."""
        return self.latent_hw[0] * int(self.config["encoders"]["downsample"])

    def record(self) -> dict:
        """What decides the images besides their captions: weights, sampling settings and seed."""
        return {"weights": self.config["weights_file"], "sampling": self.settings.to_dict(), "seed": self.seed}

    def latents(self, captions: list[str], indices: list[int]) -> torch.Tensor:
        """Sampled latents (N, C, h, w) for captions, image k seeded by (seed, indices[k])."""
        emb = self.text.encode(captions).to(self.device)  # (N, L, D)
        shape = (self.net.in_channels, *self.latent_hw)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return generate_latents(self.denoiser, emb, self.null, self.settings, image_seeds(self.seed, indices),
                                    shape)

    @torch.no_grad()
    def __call__(self, captions: list[str], indices: list[int]) -> list[Image.Image]:
        """Render captions (one image each) to PIL images."""
        return to_pil(self.vae.decode(self.latents(captions, indices)))
