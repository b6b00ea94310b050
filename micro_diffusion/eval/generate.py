"""Text-to-image from an exported model: captions -> embeddings -> latents (the one sampling path) -> PIL images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.geneval import sample_path, write_prompt, write_sample
from ..diffusion.edm import EDMPrecond
from ..diffusion.sampling import SamplingSettings, generate_latents, image_seeds
from ..encoders import load_text_encoder, load_vae
from ..exported import load_exported
from ..utils.devices import autocast, compute_dtype, dtype_name, torch_device
from ..utils.images import to_pil
from ..utils.sizes import as_hw


def check_sampling(config: dict, settings: SamplingSettings, where: str) -> None:
    """A distilled student samples with `consistency` and no guidance (its teacher's is baked in); a diffusion model
    never with `consistency`. Anything else is an error naming the export and what to ask for instead."""
    student = config.get("distilled")
    if student and settings.sampler != "consistency":
        raise ValueError(f"{where} is a distilled student (guidance {student['guidance']} baked in): sample it with "
                         f"--sampler consistency --steps 1, 2 or 4, not --sampler {settings.sampler}")
    if student and settings.guidance != 1.0:
        raise ValueError(f"{where} is a distilled student with its teacher's guidance {student['guidance']} baked "
                         f"in: drop --guidance {settings.guidance:g}")
    if not student and settings.sampler == "consistency":
        raise ValueError(f"{where} is a diffusion model: consistency sampling needs a student made by "
                         "`micro-diffusion distill`; use heun, euler, ddim, stochastic or dpmpp_2m")


class TextToImage:
    """An exported network with the VAE and text encoder its config names, rendering captions from per-image seeds.

    Image k of a run seeded `seed` is sampled from the seed of (seed, k) (`image_seeds`), so it does not depend on
    batching, sharding or resumption, and equals image k of a training grid with the same seed and weights.
    """

    def __init__(self, model_dir: str | Path, settings: SamplingSettings, seed: int = 0, use_ema: bool | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        self.settings, self.seed, self.device = settings, seed, torch_device(str(device) if device else None)
        self.where = str(model_dir)
        self.net, self.config, null = load_exported(model_dir, use_ema, self.device)
        check_sampling(self.config, settings, self.where)
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
        """What decides the images besides their captions: weights, sampling settings, seed and compute dtype."""
        return {"weights": self.config["weights_file"], "sampling": self.settings.to_dict(), "seed": self.seed,
                "dtype": dtype_name(compute_dtype(self.device))}

    def latents(self, captions: list[str], indices: list[int]) -> torch.Tensor:
        """Sampled latents (N, C, h, w) for captions, image k seeded by (seed, indices[k])."""
        return self.sample(self.text.encode(captions).to(self.device), indices)  # caption embeddings (N, L, D)

    def sample(self, emb: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Sampled latents (N, C, h, w) for caption embeddings (N, L, D): the network's part of rendering."""
        shape = (self.net.in_channels, *self.latent_hw)
        with autocast(self.device, compute_dtype(self.device)):  # bf16 where the device runs it fast, else fp32
            return generate_latents(self.denoiser, emb, self.null, self.settings, image_seeds(self.seed, indices),
                                    shape)

    @torch.no_grad()
    def __call__(self, captions: list[str], indices: list[int]) -> list[Image.Image]:
        """Render captions (one image each) to PIL images."""
        return to_pil(self.vae.decode(self.latents(captions, indices)))


def sample_geneval(render: TextToImage, lines: list[dict], out: str | Path, images_per_prompt: int = 4,
                   batch_size: int = 16, progress: bool = True) -> int:
    """Render GenEval metadata lines into GenEval's layout: image k of prompt p is image p*K+k of the run (its own seed
    from image_seeds); images already on disk are kept, so an interrupted run resumes. Returns images written."""
    todo = []
    for p, line in enumerate(lines):
        write_prompt(out, p, line)
        todo += [(p, k) for k in range(images_per_prompt) if not sample_path(out, p, k).is_file()]
    for i in tqdm(range(0, len(todo), batch_size), desc="sample", disable=not progress):
        batch = todo[i : i + batch_size]
        images = render([lines[p]["prompt"] for p, _ in batch], [p * images_per_prompt + k for p, k in batch])
        for (p, k), image in zip(batch, images, strict=True):
            write_sample(out, p, k, image)
    return len(todo)
