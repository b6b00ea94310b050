"""The frozen image autoencoder: images in [-1, 1] <-> latents already multiplied by the VAE's scaling factor."""
from __future__ import annotations

import os

import torch
from torch import nn

# The default for real runs. madebyollin/sdxl-vae-fp16-fix is SDXL's VAE fine-tuned so that its activations stay in
# fp16 range: its latents match SDXL's (same scaling factor 0.13025), but encoding and decoding in fp16/bf16 do not
# overflow into NaNs the way stabilityai/sdxl-vae does, so precompute can run in half precision on any GPU.
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"


class FrozenVAE(nn.Module):
    """A diffusers AutoencoderKL in eval mode with gradients off, encoding and decoding in micro-batches."""

    def __init__(self, vae: nn.Module, name: str, batch_size: int = 32) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.batch_size = batch_size
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        # SDXL's VAE has no shift; later VAEs (SD3, Flux) subtract one before scaling, so honour it when present.
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) images in [-1,1] -> (N,C,H/f,W/f) float32 latents: posterior mean, shifted and scaled."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.to(device=self.device, dtype=self.dtype)  # (n, 3, H, W)
            mean = self.vae.encode(x).latent_dist.mean  # (n, C, H/f, W/f)
            out.append(((mean.float() - self.shift_factor) * self.scaling_factor))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N,C,h,w) scaled latents -> (N,3,h*f,w*f) float32 images clamped to [-1,1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (N, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        out = []
        for chunk in latents.split(self.batch_size):
            z = chunk.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor  # (n,C,h,w)
            out.append(self.vae.decode(z).sample.float().clamp(-1.0, 1.0))  # (n, 3, h*f, w*f)
        return torch.cat(out)


def hub_subfolder(hub_id: str) -> tuple[str, str | None]:
    """'org/name' -> ('org/name', None); 'org/name/sub/dir' -> ('org/name', 'sub/dir'): a VAE inside a pipeline repo."""
    parts = hub_id.split("/", 2)
    return ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (hub_id, None)


def load_vae(
    id_or_path: str = DEFAULT_VAE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> FrozenVAE:
    """Load a frozen AutoencoderKL.

    Args:
        id_or_path: a Hugging Face hub id (needs the network or a filled cache), optionally with a subfolder
            ("stabilityai/stable-diffusion-xl-base-1.0/vae", the released models' VAE), or a local folder written by
            `save_pretrained` (config.json + weights). Default: the fp16-safe SDXL VAE.
        device: where the weights live and the computation runs.
        dtype: weight and compute dtype (torch.bfloat16 or float16 on GPUs; outputs are always float32).
        batch_size: micro-batch size of encode/decode, bounding activation memory.

    Returns:
        FrozenVAE with .encode, .decode, .scaling_factor, .latent_channels, .downsample.
    """
    from diffusers import AutoencoderKL

    looks_local = os.path.isabs(id_or_path) or id_or_path.startswith(".") or os.path.exists(id_or_path)
    if looks_local and not os.path.isfile(os.path.join(id_or_path, "config.json")):
        raise FileNotFoundError(f"VAE folder {id_or_path} has no config.json (write it with save_pretrained)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    repo, subfolder = (id_or_path, None) if looks_local else hub_subfolder(id_or_path)
    vae = AutoencoderKL.from_pretrained(repo, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    return FrozenVAE(vae.to(device), name=id_or_path, batch_size=batch_size)
