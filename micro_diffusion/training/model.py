"""The Composer glue: a MicroDiT, the EDM loss and latent batches, plus sampling with raw or EMA weights."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from composer.models import ComposerModel

from micro_diffusion.diffusion.edm import SIGMA_DATA, edm_loss
from micro_diffusion.diffusion.sampling import guided_net_denoiser, sample
from micro_diffusion.models.blocks import DiTBlock


class DiffusionModel(ComposerModel):
    """Trains `net` with the (masked) EDM loss on {"latents", "caption_emb", "caption"} batches.

    Args:
        net: a MicroDiT (create_dit); Composer wraps it (FSDP/DDP) as the child module `net`.
        mask_ratio: fraction of patches dropped in training (0 for the unmasked stages).
        p_mean: mean of ln(sigma) of the training noise levels.
        p_std: std of ln(sigma) of the training noise levels.
        sigma_data: std of the latents (0.9 for SDXL-VAE latents after the scaling factor).
        eval_seed: seed of the generator validation uses when none is given, so evaluations are comparable.
    """

    def __init__(self, net: torch.nn.Module, mask_ratio: float = 0.0, p_mean: float = -0.6, p_std: float = 1.2,
                 sigma_data: float = SIGMA_DATA, eval_seed: int = 0):
        super().__init__()
        self.net = net
        # FSDP reads this from the wrapped child: one FSDP unit per transformer block.
        net.fsdp_wrap_fn = lambda module: isinstance(module, DiTBlock)
        self.mask_ratio, self.p_mean, self.p_std, self.sigma_data = mask_ratio, p_mean, p_std, sigma_data
        self.eval_seed = eval_seed
        self.ema: Any = None  # composer.algorithms.EMA once attach_ema is called
        self._batch_seed: int | None = None
        self._microbatch = 0

    def set_batch_seed(self, seed: int | None) -> None:
        """Seed the noise levels, noise and masks of the next batch (StepSeed calls this at every batch start)."""
        self._batch_seed, self._microbatch = seed, 0

    def _train_generator(self, device: torch.device) -> torch.Generator | None:
        # A generator per (batch, microbatch) makes a resumed run draw exactly what an uninterrupted one draws:
        # Composer does not restore the global RNG when the loader resumes mid-epoch by itself.
        if self._batch_seed is None:
            return None  # outside the trainer: the global RNG
        seed = (self._batch_seed * 1_000_003 + self._microbatch) % 2**63
        self._microbatch += 1
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of one (micro)batch."""
        latents = batch["latents"]
        return edm_loss(self.net, latents, batch["caption_emb"], self.p_mean, self.p_std, self.sigma_data,
                        self.mask_ratio, self._train_generator(latents.device))

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], *args, **kwargs) -> torch.Tensor:
        """The loss is computed in forward; Composer's loss step only hands it on."""
        return outputs

    def eval_forward(self, batch: dict[str, Any], outputs: Any = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Validation loss, unmasked, with noise from `generator` (default: a fresh one seeded by eval_seed)."""
        latents = batch["latents"]
        if generator is None:
            generator = torch.Generator(device=latents.device).manual_seed(self.eval_seed)
        with torch.no_grad():
            return edm_loss(self.net, latents, batch["caption_emb"], self.p_mean, self.p_std, self.sigma_data,
                            0.0, generator)

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

    @torch.no_grad()
    def generate(self, caption_emb: torch.Tensor, null_caption: torch.Tensor | np.ndarray, steps: int = 30,
                 guidance: float = 5.0, sampler: str = "heun", seed: int = 0, use_ema: bool = False,
                 latent_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Sample latents (N, C, H, W) for caption embeddings (N, L, D) with classifier-free guidance."""
        device = next(self.parameters()).device
        caption_emb = caption_emb.to(device=device, dtype=torch.float32)
        size = latent_size if latent_size is not None else self.net.cfg.latent_size
        h, w = (size, size) if isinstance(size, int) else size
        gen = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn((caption_emb.shape[0], self.net.in_channels, h, w), generator=gen, device=device)
        was_training = self.training
        self.eval()
        try:
            with self.weights(use_ema):
                denoiser = guided_net_denoiser(self.net, caption_emb, null_caption, guidance,
                                               sigma_data=self.sigma_data)
                return sample(denoiser, noise, steps=steps, sampler=sampler, generator=gen)
        finally:
            self.train(was_training)
