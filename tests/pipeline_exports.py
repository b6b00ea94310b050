"""Tiny exports for the pipeline, card and push tests: a MicroDiT, its distilled student and a Fluid, all with a random
2x VAE (16 px images) and the packaged MiniLM text encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CAP_D, CAP_LEN = 384, 8


def tiny_vae(out: Path) -> Path:
    """A random 2x AutoencoderKL saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(out)
    return out


def encoders(vae: Path) -> dict:
    """The encoders.json record of the tiny exports."""
    return {"vae": str(vae), "scaling_factor": 1.0, "latent_channels": 4, "downsample": 2, "text_encoder": "minilm",
            "caption_len": CAP_LEN, "caption_dim": CAP_D, "resolutions": [16]}


def tiny_export(out: Path, vae: Path, kind: str = "dit", extra: dict | None = None, card=None) -> Path:
    """An export of a random network: kind "dit", "student" (a consistency student) or "fluid"."""
    from micro_diffusion.exported import export_model
    from micro_diffusion.models import create_dit
    from micro_diffusion.models.fluid import create_fluid

    torch.manual_seed(1)
    if kind == "fluid":
        net = create_fluid("Fluid_Micro", latent_size=8, in_channels=4, caption_dim=CAP_D)
        config = {"family": "fluid", "preset": "Fluid_Micro",
                  "sampling": {"steps": 2, "guidance": 2.0, "sampler": "fluid", "temperature": 0.9, "head_steps": 4}}
    else:
        net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=CAP_D, width=64, depth=2, head_dim=16,
                         patch_mixer_depth=1, patch_mixer_width=64)
        config = {"preset": "MicroDiT_Tiny_2", "sampling": {"steps": 3, "guidance": 2.5, "sampler": "euler"}}
        if kind == "student":
            config = {**config, "sampling": {"steps": 1, "guidance": 1.0, "sampler": "consistency"},
                      "distilled": {"guidance": 4.0, "sigma_max": 80.0, "teacher": "tiny"}}
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    config = {**config, "network": net.cfg.to_dict(), "recipe": f"tiny_{kind}", "sigma_data": 0.9,
              "encoders": encoders(vae), **(extra or {})}
    null = np.random.default_rng(0).standard_normal((CAP_LEN, CAP_D)).astype(np.float16)
    return export_model(net.state_dict(), None, config, null, out, card=card)
