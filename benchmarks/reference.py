"""The public reference implementation (SonyResearch/micro_diffusion) loaded beside ours, for side-by-side timing.

Its package is also named `micro_diffusion`, so its network modules are imported from a local checkout under another
package name (REFERENCE_PACKAGE); nothing is vendored or downloaded. Its network imports einops, timm, open_clip,
transformers and torchmetrics: `pip install -e '.[reference]'` adds the one of them the lock lacks (einops).
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from micro_diffusion.models import DiTOutput
from micro_diffusion.models.patches import keep_pixels, patch_grid

REFERENCE_PACKAGE = "reference_micro_diffusion_models"  # the checkout's micro_diffusion/models, renamed


def load_reference_models(checkout: str | Path) -> types.ModuleType:
    """The reference's `micro_diffusion.models.dit` module from a checkout folder, imported as REFERENCE_PACKAGE.dit."""
    folder = Path(checkout) / "micro_diffusion" / "models"
    if not (folder / "dit.py").is_file():
        raise FileNotFoundError(f"{checkout}: no micro_diffusion/models/dit.py; give a checkout of "
                                "SonyResearch/micro_diffusion")
    if REFERENCE_PACKAGE not in sys.modules:  # a package object whose path is the checkout's models folder
        package = types.ModuleType(REFERENCE_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[REFERENCE_PACKAGE] = package
    elif sys.modules[REFERENCE_PACKAGE].__path__ != [str(folder)]:
        raise RuntimeError(f"a reference from {sys.modules[REFERENCE_PACKAGE].__path__[0]} is already loaded")
    try:
        return importlib.import_module(f"{REFERENCE_PACKAGE}.dit")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the reference network at {folder} needs {err.name!r}: "
                                  "pip install -e '.[reference]'") from err


class ReferenceNet(nn.Module):
    """The reference DiT behind our network's call: (x, c_noise, caption_tokens, mask_ratio) -> DiTOutput.

    So the same EDM denoiser and loss (diffusion/edm.py) drive both networks. The reference draws its masked patches
    from the global RNG, so a `generator` is refused rather than ignored.
    """

    def __init__(self, net: nn.Module, patch_size: int):
        super().__init__()
        self.net, self.patch_size = net, patch_size

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, caption_tokens: torch.Tensor, mask_ratio: float = 0.0,
                generator: Any = None) -> DiTOutput:
        if generator is not None:
            raise ValueError("the reference network draws its patches from the global RNG; pass generator=None")
        out = self.net(x, c_noise, caption_tokens.unsqueeze(1), mask_ratio=mask_ratio)  # captions (N, 1, L, D)
        mask = None if out["mask"] is None else out["mask"].bool()  # (N, T), True where dropped
        keep = None if mask is None else keep_pixels(mask, patch_grid(x.shape[-2:], self.patch_size), self.patch_size)
        return DiTOutput(sample=out["sample"], mask=mask, keep=keep)


def create_reference(checkout: str | Path, preset: str, latent_size: int, caption_dim: int) -> ReferenceNet:
    """The reference's preset (its MicroDiT_Tiny_2 or MicroDiT_XL_2) at a latent size, behind our call."""
    dit = load_reference_models(checkout)
    if not hasattr(dit, preset):
        raise KeyError(f"the reference at {checkout} has no preset {preset!r}")
    net = getattr(dit, preset)(caption_channels=caption_dim, input_size=latent_size)
    return ReferenceNet(net, net.patch_size)
