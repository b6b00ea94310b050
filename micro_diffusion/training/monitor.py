"""Periodic monitoring callbacks: validation loss on held-out shards and sample grids for fixed prompts."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Callback, Event, State, get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from PIL import Image

from micro_diffusion.diffusion.sampling import SamplingSettings, image_seeds
from micro_diffusion.training.model import unwrap
from micro_diffusion.utils.devices import autocast, compute_dtype
from micro_diffusion.utils.images import grid, to_pil
from micro_diffusion.utils.modes import module_mode
from micro_diffusion.utils.run_folder import VAL_LOSS, VAL_LOSS_EMA
from micro_diffusion.utils.seeds import seeded_generator


class ValidationLoss(Callback):
    """Logs `val/loss` (and `val/loss_ema` once EMA runs): unmasked EDM loss on `max_batches` held-out batches.

    The batches are read once and kept, and every evaluation draws noise from a generator reset to the same seed,
    so successive values differ only because the weights changed. With `sigmas` (K,) the loss is the mean over that
    fixed grid of noise levels instead of over log-normal draws.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], interval: str, max_batches: int, seed: int = 0,
                 sigmas: torch.Tensor | None = None):
        self.loader, self.max_batches, self.seed, self.sigmas = loader, max_batches, seed, sigmas
        self.due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self._batches: list[dict[str, Any]] | None = None
        self.history: list[tuple[int, float]] = []

    def _held_out(self) -> list[dict[str, Any]]:
        if self._batches is None:
            self._batches = []
            for i, batch in enumerate(self.loader):
                if i >= self.max_batches:
                    break
                self._batches.append({"latents": batch["latents"], "caption_emb": batch["caption_emb"]})
            if not self._batches:
                raise RuntimeError("the validation loader yielded no batches (too few held-out samples per rank?)")
        return self._batches

    def loss(self, state: State, use_ema: bool) -> float:
        """Mean validation loss over the held-out batches, summed over ranks."""
        model = unwrap(state.model)
        device = next(model.parameters()).device
        gen = seeded_generator(self.seed + dist.get_global_rank(), device)
        total = torch.zeros(2, device=device)  # (sum of losses x samples, samples)
        with model.weights(use_ema), get_precision_context(state.precision):
            for batch in self._held_out():
                batch = {k: v.to(device) for k, v in batch.items()}
                n = batch["latents"].shape[0]
                total += torch.stack([model.validation_loss(batch, gen, self.sigmas).float() * n,
                                      torch.tensor(float(n), device=device)])
        dist.all_reduce(total, reduce_operation="SUM")
        return float(total[0] / total[1])

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.due(state, Event.BATCH_END):
            return
        metrics = {VAL_LOSS: self.loss(state, use_ema=False)}
        if unwrap(state.model).ema_active():
            metrics[VAL_LOSS_EMA] = self.loss(state, use_ema=True)
        self.history.append((int(state.timestamp.batch), metrics[VAL_LOSS]))
        logger.log_metrics(metrics)


def image_grid(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> one uint8 (rows*H, cols*W, 3) grid."""
    return np.asarray(grid(to_pil(images), columns))


class SampleGrid(Callback):
    """Every `interval`, samples the fixed prompts and writes a PNG grid to `out_dir` and to the loggers.

    Prompt k is sampled from the per-image seed of (seed, k) through the project's one sampling path, so image k of a
    grid is reproduced by `micro-diffusion sample --seed SEED` on the exported model with the same weights.

    Args:
        prompt_emb: (P, L, D) caption embeddings of the prompts, computed once before training.
        null_caption: (L, D) embedding of the empty caption (the unconditional branch of guidance).
        decode: maps latents (P, C, h, w) to images (P, 3, H, W) in [-1, 1] (the dataset's VAE); rank 0 only.
        out_dir: folder of the PNGs (`ba{batch}.png`, and `ba{batch}_ema.png` once EMA runs).
        interval: Composer time string, e.g. "5000ba".
        shape: (C, h, w) of the latents to sample.
        settings: sampler, steps and guidance.
        seed: the grid's seed (the same each time, so grids are comparable).
    """

    def __init__(self, prompt_emb: torch.Tensor, null_caption: torch.Tensor | np.ndarray,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None, out_dir: str | Path, interval: str,
                 shape: tuple[int, int, int], settings: SamplingSettings, seed: int):
        self.prompt_emb, self.null_caption, self.decode = prompt_emb, null_caption, decode
        self.out_dir, self.shape, self.settings, self.seed = Path(out_dir), shape, settings, seed
        self.due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self.written: list[Path] = []
        self.latest: dict[str, torch.Tensor] = {}  # "raw" / "ema" -> the last grid's latents (P, C, h, w), on CPU

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.due(state, Event.BATCH_END):
            return
        model = unwrap(state.model)
        kinds = [False, True] if model.ema_active() else [False]
        for use_ema in kinds:
            # Every rank samples: under FSDP each forward gathers weight shards from all ranks.
            latents = self._sample(model, state, use_ema)
            self.latest["ema" if use_ema else "raw"] = latents.cpu()
            if dist.get_global_rank() == 0:
                self._write(latents, int(state.timestamp.batch), use_ema, logger)

    def _sample(self, model, state: State, use_ema: bool) -> torch.Tensor:
        device = next(model.parameters()).device
        seeds = image_seeds(self.seed, range(self.prompt_emb.shape[0]))
        # eval mode, the chosen weights and the compute dtype, as `micro-diffusion sample`
        with module_mode(model, training=False), model.weights(use_ema), autocast(device, compute_dtype(device)):
            return model.generate(self.prompt_emb.to(device, torch.float32), self.null_caption, self.settings,
                                  seeds, self.shape)

    def _write(self, latents: torch.Tensor, batch: int, use_ema: bool, logger: Logger) -> None:
        if self.decode is None:
            raise RuntimeError("SampleGrid on rank 0 needs a decode function (the dataset's VAE)")
        with torch.no_grad():
            images = self.decode(latents.float())  # (P, 3, H, W) in [-1, 1]
        pixels = image_grid(images)
        name = f"ba{batch}{'_ema' if use_ema else ''}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        Image.fromarray(pixels).save(path)
        self.written.append(path)
        logger.log_images(pixels, name=f"samples/{'ema' if use_ema else 'raw'}", channels_last=True,
                          step=batch, use_table=False)  # W&B: an image panel, not a table
