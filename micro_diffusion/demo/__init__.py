"""The CPU demo: its pipeline and a small trained VAE (its scenes are data.shapes, its reader eval.reader)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = Path("runs/demo")  # where `make demo` and `micro-diffusion demo` write unless told otherwise


def demo_vae_path() -> Path:
    """Folder of the small demo AutoencoderKL (diffusers `save_pretrained` layout), shipped as package data."""
    return Path(__file__).resolve().parent / "assets" / "vae"
