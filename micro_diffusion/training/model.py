"""The Composer glue: a network of either model family trained with its family's loss on latent batches, with raw
or EMA weights."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from composer.models import ComposerModel
from torch import nn

from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import SamplingSettings
from micro_diffusion.families import DEFAULT_FAMILY, FAMILIES
from micro_diffusion.utils.seeds import derive_seed, seeded_generator

NOISE_STREAM, PATCH_STREAM = 0, 1  # the two seeded draws of a microbatch: noise levels and noise; the patch draw


class DiffusionModel(ComposerModel):
    """Trains `net` with its family's loss on {"latents", "caption_emb", "caption"} batches (families.FAMILIES).

    Args:
        net: a network of the family (create_dit, create_fluid); Composer wraps it (FSDP/DDP) as the child `net`.
        mask_ratio: MicroDiT: fraction of patches the network drops in training (0 for the unmasked stages);
            None for Fluid, which draws its own ratio per batch.
        p_mean: mean of ln(sigma) of the EDM training noise levels (MicroDiT; None for Fluid).
        p_std: std of ln(sigma) of the EDM training noise levels (MicroDiT; None for Fluid).
        sigma_data: std of the latents, as the shards record them (Fluid's tokens are the latents over it).
        family: the model family's name.
    """

    def __init__(self, net: nn.Module, mask_ratio: float | None, p_mean: float | None, p_std: float | None,
                 sigma_data: float, family: str = DEFAULT_FAMILY):
        super().__init__()
        self.net, self.family = net, FAMILIES[family]
        # FSDP reads these from the wrapped child: one FSDP unit per transformer block, and (with the fsdp config's
        # activation_checkpointing) the same blocks recomputed in the backward.
        blocks = self.family.block_types
        net.fsdp_wrap_fn = lambda module: isinstance(module, blocks)
        net.activation_checkpointing_fn = lambda module: isinstance(module, blocks)
        self.mask_ratio, self.p_mean, self.p_std, self.sigma_data = mask_ratio, p_mean, p_std, sigma_data
        self.ema: Any = None  # composer.algorithms.EMA once attach_ema is called
        self._batch_seed: int | None = None
        self._microbatch = 0

    @property
    def denoiser(self) -> EDMPrecond:
        """The EDM denoiser around the network as it is now (Composer may have replaced `net` by its wrapper)."""
        return EDMPrecond(self.net, self.sigma_data)

    def set_batch_seed(self, seed: int | None) -> None:
        """Seed the noise levels, noise and masks of the next batch (StepSeed calls this at every batch start)."""
        self._batch_seed, self._microbatch = seed, 0

    def _train_generators(self, device: torch.device) -> tuple[torch.Generator | None, torch.Generator | None]:
        # Generators per (batch, microbatch) make a resumed run draw exactly what an uninterrupted one draws:
        # Composer does not restore the global RNG when the loader resumes mid-epoch by itself.
        if self._batch_seed is None:
            return None, None  # outside the trainer: the global RNG
        seeds = [derive_seed(self._batch_seed, self._microbatch, s) for s in (NOISE_STREAM, PATCH_STREAM)]
        self._microbatch += 1
        noise, patches = (seeded_generator(s, device) for s in seeds)
        return noise, patches

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of one (micro)batch."""
        latents = batch["latents"]
        return self.family.loss(self.net, latents, batch["caption_emb"], self.diffusion,
                                self._train_generators(latents.device))

    @property
    def diffusion(self) -> dict[str, Any]:
        """The recipe's diffusion settings as the family's loss reads them."""
        return {"mask_ratio": self.mask_ratio, "p_mean": self.p_mean, "p_std": self.p_std,
                "sigma_data": self.sigma_data}

    def generate(self, cond: torch.Tensor, null: torch.Tensor | np.ndarray, settings: SamplingSettings,
                 seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
        """Latents of the network as it is now, through its family's one sampling path."""
        return self.family.generate(self.net, cond, null, settings, seeds, shape, self.sigma_data)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], *args, **kwargs) -> torch.Tensor:
        """The loss is computed in forward; Composer's loss step only hands it on."""
        return outputs

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Any], generator: torch.Generator,
                        sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """The family's validation loss of a held-out batch, every draw from `generator` (MicroDiT: the unmasked EDM
        loss at log-normal noise levels, or averaged over a fixed grid `sigmas` (K,) when given)."""
        return self.family.val_loss(self.net, batch["latents"], batch["caption_emb"], self.diffusion, generator,
                                    sigmas)

    def attach_ema(self, ema: Any) -> None:
        """Remember Composer's EMA algorithm so sampling can use its weights."""
        self.ema = ema

    def ema_active(self) -> bool:
        """True once the EMA algorithm has started averaging."""
        return self.ema is not None and bool(self.ema.ema_started) and self.ema.ema_model is not None

    @contextmanager
    def weights(self, use_ema: bool) -> Iterator[None]:
        """Run the body with EMA (use_ema=True) or raw training weights in the network, then restore."""
        if use_ema and not self.ema_active():
            raise RuntimeError("EMA weights were asked for, but no EMA is running (add algorithms.ema to the recipe, "
                               "or wait until its start)")
        swap = self.ema_active() and bool(self.ema.ema_weights_active) != use_ema
        if swap:
            self._swap_ema()
        try:
            yield
        finally:
            if swap:
                self._swap_ema()

    def _swap_ema(self) -> None:
        store = self.ema.ema_model
        names = {n for n, _ in self.named_parameters()}
        missing = set(store.named_parameters_dict) - names
        if missing:  # Composer's swap skips unknown names; a partial swap would mix raw and EMA weights
            raise RuntimeError(f"EMA holds parameters this model lacks: {sorted(missing)[:3]}")
        store.swap_params(model=self)
        self.ema.ema_weights_active = not self.ema.ema_weights_active


def unwrap(model: torch.nn.Module) -> DiffusionModel:
    """The DiffusionModel inside a DDP wrapper (FSDP wraps only its children)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, DiffusionModel):
        raise TypeError(f"expected a DiffusionModel in the trainer, got {type(inner).__name__}")
    return inner
