"""The Python pipeline: an export (a folder or `hf://org/name`) with its encoders, called with captions for images.

    from micro_diffusion import Pipeline
    pipe = Pipeline.from_pretrained("runs/demo/model")      # or "hf://org/name"
    images = pipe(["a red circle at the top left"], steps=30, guidance=5.0, seed=0).images   # PIL images

It samples through the same step as `micro-diffusion sample` (eval.generate.render_captions): image k of a call
equals image k of `micro-diffusion sample` with the same seed and settings, whatever the batch size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import UsageError, check_counts
from .generate import TextToImage, check_request, render_captions, settings_for
from .hub import resolve_model

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class PipelineOutput:
    """A call's images (PIL, in caption order), their latents (N, C, h, w) float32, and what decided them."""

    images: list[Image.Image]
    latents: torch.Tensor
    record: dict[str, Any]


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name; None stays None (the device's fastest)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class Pipeline:
    """Text to images with an exported model; defaults are the sampling settings its config.json records."""

    def __init__(self, render: TextToImage, source: str, batch_size: int = 16,
                 defaults: dict[str, Any] | None = None):
        check_counts(batch_size=batch_size)
        self.render, self.source, self.batch_size = render, source, batch_size
        self.defaults = {k: v for k, v in (defaults or {}).items() if v is not None}  # over the export's settings

    @classmethod
    def from_pretrained(cls, model: str | Path, *, sampler: str | None = None, steps: int | None = None,
                        guidance: float | None = None, use_ema: bool | None = None, device: str | None = None,
                        dtype: torch.dtype | str | None = None, batch_size: int = 16, **settings: Any) -> Pipeline:
        """Load an export folder or `hf://org/name[@revision]` (through the Hub cache) with the VAE and text encoder
        that it records, on `device` (None: CUDA when present, else CPU).

        sampler, steps, guidance and the other SamplingSettings fields given here become this pipeline's defaults
        (left out: the export's). dtype: the compute dtype of sampling (None: bf16 where the device runs it fast,
        else fp32). use_ema=None takes the EMA weights when the export has them.
        """
        folder = resolve_model(model)
        given = {"sampler": sampler, "steps": steps, "guidance": guidance, **settings}
        resolved = check_request(folder, given, use_ema)[1]
        render = TextToImage(folder, resolved, 0, use_ema, device, compute=_dtype(dtype))
        return cls(render, str(model), batch_size, given)

    @property
    def config(self) -> dict:
        """The export's config.json (with "weights_file", the weights that were loaded)."""
        return self.render.config

    @property
    def settings(self) -> Any:
        """The default SamplingSettings of a call."""
        return self.render.settings

    def __call__(self, prompts: str | Sequence[str], steps: int | None = None, guidance: float | None = None,
                 seed: int = 0, sampler: str | None = None, batch_size: int | None = None,
                 progress: bool = False, **settings: Any) -> PipelineOutput:
        """Images for prompts (one each), image k seeded by (seed, k); settings left out are the pipeline's."""
        captions = [prompts] if isinstance(prompts, str) else list(prompts)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise UsageError("give one caption or a list of captions (strings)")
        check_counts(batch_size=batch_size)
        given = {"steps": steps, "guidance": guidance, "sampler": sampler, **settings}
        resolved = settings_for(self.config, {**self.defaults, **{k: v for k, v in given.items() if v is not None}})
        render = self.render.with_settings(resolved, seed)
        images, latents = render_captions(render, captions, batch_size or self.batch_size, progress)
        return PipelineOutput(images, latents, {"model": self.source, **render.record()})
