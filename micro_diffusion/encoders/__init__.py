"""Frozen encoders behind one small interface each: the image VAE and the caption text encoder."""
from micro_diffusion.encoders.text import (
    DEFAULT_TEXT_ENCODER,
    MINILM_SPEC,
    FrozenTextEncoder,
    load_text_encoder,
    minilm_path,
)
from micro_diffusion.encoders.vae import DEFAULT_VAE, FrozenVAE, load_vae

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "DEFAULT_VAE",
    "MINILM_SPEC",
    "FrozenTextEncoder",
    "FrozenVAE",
    "load_text_encoder",
    "load_vae",
    "minilm_path",
]
