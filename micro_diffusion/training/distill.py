"""Consistency distillation with Composer: a student MicroDiT learns the guided teacher's ODE (sCD, TrigFlow).

The student is `net` (so checkpoints export like any run's network), the teacher a frozen copy of the weights the
stage starts from, `weighting` the learned loss weighting (training state only; never exported).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.trigflow import AdaptiveWeight, guided_velocity, scd_loss
from micro_diffusion.exported import is_export, load_weights
from micro_diffusion.models import MicroDiT
from micro_diffusion.models.attention import plain_attention
from micro_diffusion.recipe import RecipeError
from micro_diffusion.training.export import load_composer_checkpoint
from micro_diffusion.training.model import DiffusionModel, unwrap


class DistillModel(DiffusionModel):
    """sCD of `teacher` into `net` (initialised from the teacher), with the teacher guided at a fixed scale.

    Args:
        net: the student, with the teacher's weights.
        teacher: the teacher network (frozen here).
        null_caption: (L, D) caption embedding of the teacher's unconditional branch.
        sigma_data, p_mean, p_std: the EDM settings of the stage (tau ~ N(p_mean, p_std^2)).
        guidance: the teacher's guidance scale, baked into the student.
        sigma_max: the highest noise level trained.
        tangent_warmup: steps over which r rises from 0 to 1.
    """

    def __init__(self, net: MicroDiT, teacher: MicroDiT, null_caption: np.ndarray | torch.Tensor, sigma_data: float,
                 p_mean: float, p_std: float, guidance: float, sigma_max: float, tangent_warmup: int):
        super().__init__(net, mask_ratio=0.0, p_mean=p_mean, p_std=p_std, sigma_data=sigma_data)
        self.teacher = teacher.requires_grad_(False)
        self.weighting = AdaptiveWeight(sigma_data)
        self.register_buffer("null_caption", torch.as_tensor(np.asarray(null_caption, dtype=np.float32)))
        self.guidance, self.sigma_max, self.tangent_warmup = guidance, sigma_max, tangent_warmup
        self.tangent_r = 0.0 if tangent_warmup else 1.0

    def set_progress(self, batch: int) -> None:
        """Tangent warmup: r = min(1, batch / tangent_warmup)."""
        self.tangent_r = min(1.0, batch / self.tangent_warmup) if self.tangent_warmup else 1.0

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """sCD loss of one (micro)batch."""
        latents, cond = batch["latents"], batch["caption_emb"]
        noise_gen, _ = self._train_generators(latents.device)
        uncond = self.null_caption.to(cond.dtype).expand_as(cond)  # (N, L, D)
        velocity = guided_velocity(EDMPrecond(self.teacher, self.sigma_data), cond, uncond, self.guidance)
        # the JVP has no fused-kernel path: attention as plain products on every device
        with plain_attention():
            loss, _ = scd_loss(self.denoiser, velocity, self.weighting, latents, cond, self.p_mean, self.p_std,
                               self.sigma_max, self.tangent_r, noise_gen)
        return loss


class TangentWarmup(Callback):
    """Before each batch, sets the distillation's tangent-warmup factor from the batch index (resumes exactly)."""

    def batch_start(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        if isinstance(model, DistillModel):
            model.set_progress(int(state.timestamp.batch))


def teacher_state(source: str, weights: str) -> dict[str, torch.Tensor]:
    """The teacher's network weights from an exported folder or a Composer checkpoint; weights: auto, ema or raw."""
    path = Path(source)
    if is_export(path):
        return load_weights(path, use_ema=None if weights == "auto" else weights == "ema")[0]
    raw, ema = load_composer_checkpoint(path)
    if weights == "ema" and ema is None:
        raise RecipeError(f"distill.teacher_weights is ema, but {path} holds no EMA weights")
    return ema if ema is not None and weights != "raw" else raw
