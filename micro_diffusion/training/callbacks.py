"""Training callbacks: a non-finite loss guard, preemption, bad-sample counts, and a plain JSONL metrics log."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from micro_diffusion.errors import NonFiniteLoss
from micro_diffusion.recipe import is_remote
from micro_diffusion.training.model import unwrap
from micro_diffusion.utils.jsonl import supersede_from
from micro_diffusion.utils.run_folder import BAD_SAMPLES as BAD_SAMPLES_FILE
from micro_diffusion.utils.run_folder import BAD_SAMPLES_SKIPPED, STEP
from micro_diffusion.utils.run_folder import LATEST_CHECKPOINT as LATEST
from micro_diffusion.utils.seeds import derive_seed


class NonFiniteLossError(NonFiniteLoss):
    """Raised when a training loss is NaN or infinite; the step that produced it never reaches the weights."""


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any rank (every rank must call this at the same point)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, reduce_operation="MAX")
    return bool(t.item() > 0)


def _loss_values(loss: Any) -> list[float]:
    if isinstance(loss, torch.Tensor):
        return [float(loss.detach().float().sum())]
    if isinstance(loss, dict):
        return [v for item in loss.values() for v in _loss_values(item)]
    if isinstance(loss, (list, tuple)):
        return [v for item in loss for v in _loss_values(item)]
    raise TypeError(f"cannot check a loss of type {type(loss).__name__}")


class NaNGuard(Callback):
    """Stop at once on a NaN/inf loss, before its backward pass and optimizer step.

    The check runs at AFTER_LOSS on every microbatch, agreed across ranks, so the bad step is neither applied nor
    checkpointed: the newest checkpoint in `save_folder` stays the last good one.
    """

    def __init__(self, save_folder: str):
        self.save_folder = save_folder

    def after_loss(self, state: State, logger: Logger) -> None:
        values = _loss_values(state.loss)
        bad_here = not all(math.isfinite(v) for v in values)
        device = state.loss.device if isinstance(state.loss, torch.Tensor) else torch.device("cpu")
        if _any_rank(bad_here, device):
            batch = int(state.timestamp.batch)
            latest = Path(self.save_folder) / LATEST
            if is_remote(self.save_folder):
                good = f"the newest one in {self.save_folder}"
            else:
                good = os.path.realpath(latest) if latest.exists() else "none saved yet"
            raise NonFiniteLossError(
                f"non-finite training loss {values if bad_here else '(on another rank)'} at batch {batch} "
                f"(rank {dist.get_global_rank()}): stopped before its optimizer step. Last good checkpoint: {good}. "
                "The loss became non-finite with finite inputs (the loader checks every sample's latents and caption "
                "embedding, and names a bad one as bad data): lower the learning rate or tighten gradient clipping, "
                "then resume from it.")


class BadSamples(Callback):
    """With data.skip_bad_samples: logs `data/bad_samples` (samples skipped in this batch, all ranks) and lists each
    skipped sample (stream, shard, sample, index, id, problem, step, rank) in the run folder's bad_samples.jsonl."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / BAD_SAMPLES_FILE

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:  # the batches after the checkpoint are read again: list their skips once
            supersede_from(self.path, int(state.timestamp.batch), f"resumed from batch {int(state.timestamp.batch)}")
        dist.barrier()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        skipped = [record for per_sample in state.batch.get("skipped", []) for record in per_sample]
        count = torch.tensor([float(len(skipped))], device=next(state.model.parameters()).device)
        dist.all_reduce(count, reduce_operation="SUM")
        step, rank = int(state.timestamp.batch), dist.get_global_rank()
        if skipped:
            with open(self.path, "a", encoding="utf-8") as f:  # one write per batch, appended: ranks share the file
                f.write("".join(json.dumps({"step": step, "rank": rank, **r}, default=str) + "\n" for r in skipped))
        logger.log_metrics({BAD_SAMPLES_SKIPPED: int(count.item())})


class StepSeed(Callback):
    """Before each batch, seeds the model's noise, noise levels and masks from (seed, rank, batch index)."""

    def __init__(self, seed: int):
        self.seed = seed

    def batch_start(self, state: State, logger: Logger) -> None:
        unwrap(state.model).set_batch_seed(derive_seed(self.seed, dist.get_global_rank(), int(state.timestamp.batch)))


class Preemption(Callback):
    """On SIGTERM (preemption), finish the current batch, save a checkpoint and stop cleanly.

    The signal handler only sets a flag; at BATCH_END the ranks agree on it and stop training, which makes
    Composer's checkpoint saver write the end-of-training checkpoint at BATCH_CHECKPOINT. Rerunning the same
    command resumes from it (autoresume).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def fit_start(self, state: State, logger: Logger) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def batch_end(self, state: State, logger: Logger) -> None:
        device = next(state.model.parameters()).device
        if _any_rank(self.requested, device):
            self.stopped_at = int(state.timestamp.batch)
            print(f"preemption signal: saving a checkpoint at batch {self.stopped_at} and stopping", flush=True)
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._restore()

    def post_close(self) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class JSONLLogger(LoggerDestination):
    """Writes one JSON line per step ({"step": n, metric: value, ...}) to `path`, on rank 0 only.

    On a resumed run, rows of the steps after the checkpoint it resumed from (logged by the process that was killed)
    move to metrics.superseded.jsonl, marked, and a line torn by the kill is dropped there too, so every step appears
    once. The row of the checkpoint's own step holds metrics from before the checkpoint: the resumed run adds to it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._step: int | None = None
        self._pending: dict[str, Any] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if dist.get_global_rank() != 0:
            return
        if step != self._step:
            self.flush()
            self._step = step
        for key, value in metrics.items():
            self._pending[key] = float(value.item()) if isinstance(value, torch.Tensor) else value

    def flush(self) -> None:
        """Append the pending step's metrics as one line."""
        if not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({STEP: self._step, **self._pending}, default=str) + "\n")
        self._pending = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        resume = int(state.timestamp.batch)
        carried: dict[str, Any] = {}
        for row in supersede_from(self.path, resume, f"resumed from batch {resume}"):
            carried.update({k: v for k, v in row.items() if k != STEP})
        if not carried:
            return
        if self._step not in (None, resume):
            self.flush()
        self._step, self._pending = resume, {**carried, **self._pending}

    def batch_end(self, state: State, logger: Logger) -> None:
        # Composer logs a batch's loss at its index n, and what callbacks log at its end (learning rate, throughput,
        # validation loss) at the count n + 1: that row stays open for batch n + 1's loss, so each step is one line.
        if self._step is None or self._step < int(state.timestamp.batch):
            self.flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.flush()

    def close(self, state: State, logger: Logger) -> None:
        self.flush()
