"""micro_diffusion: train text-to-image sparse diffusion transformers from scratch on a micro budget."""

__version__ = "0.1.0"
