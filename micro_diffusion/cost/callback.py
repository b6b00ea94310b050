"""The cost ledger: a Composer callback that counts wall-clock, device-hours, dollars, samples and FLOPs.

Ledger of record. Progress (samples, FLOPs) is Composer's checkpointed timestamp, so work redone after a resume is
counted once. Spend (wall-clock, device-hours, dollars) is what the devices were held for: the checkpointed spend,
plus the spend that the interrupted session logged to cost.jsonl after that checkpoint (read back on resume: that
time was paid even though its batches are redone), plus the time of this session since its Trainer was built. Time
between a crash and the restart is not counted (no device is held). Lost spend is exact up to `log_interval_s`.

Stages chain through `carry_over`: the previous stage's run folder (its last cost.jsonl record) or its totals dict.
A resumed stage uses the carry-over stored in its checkpoint. Budget caps (`max_usd`, `max_device_hours`) apply to
the running total including carried-over stages; reaching one stops training after the batch and Composer's
CheckpointSaver writes its end-of-training checkpoint, so a cap needs a checkpoint save folder.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from ..utils.devices import dtype_name
from ..utils.run_folder import cost_key
from .ledger import COST_FILE, Totals, load_carry_over, read_records
from .prices import detect_device_type, device_spec, run_peak_tflops, usd_per_device_hour


class CostCallback(Callback):
    """Logs wall-clock, device-hours, dollars, samples, FLOPs and utilisation; stops the run at a budget cap.

    Args:
        run_dir: run folder; cost.jsonl is appended there by global rank 0.
        flops_per_sample: forward+backward FLOPs of one training sample (cost.flops.train_flops_per_sample).
        device_type: a key of cost.prices.DEVICES; None detects it (a GPU by name, else 'cpu', priced per core).
        usd_per_device_hour: price override; None takes MICRO_DIFFUSION_USD_PER_DEVICE_HOUR, else the table.
        max_usd, max_device_hours: budget caps on the running total, carried-over stages included.
        stage: name of this stage, written in every record.
        carry_over: previous stage's run folder or totals dict.
        peak_tflops: per-device peak override; None takes the table's peak in the run's precision (Composer's
            state.precision: fp32, or bf16/fp16 autocast), or on CPU a short matmul timing in that precision.
        log_interval_s: least wall-clock seconds between records (always one at the end and at a budget stop).
        clock: monotonic seconds; replaceable so tests can drive time exactly.
    """

    def __init__(
        self,
        run_dir: str | Path,
        flops_per_sample: float,
        device_type: str | None = None,
        usd_per_device_hour: float | None = None,
        max_usd: float | None = None,
        max_device_hours: float | None = None,
        stage: str = "train",
        carry_over: str | Path | dict[str, Any] | None = None,
        peak_tflops: float | None = None,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if flops_per_sample <= 0:
            raise ValueError(f"flops_per_sample must be positive, got {flops_per_sample}")
        for name, cap in (("max_usd", max_usd), ("max_device_hours", max_device_hours)):
            if cap is not None and cap <= 0:
                raise ValueError(f"{name} must be positive, got {cap}")
        if device_type is not None:
            device_spec(device_type)  # unknown names fail here, before training starts
        self.run_dir, self.flops_per_sample, self.stage = Path(run_dir), float(flops_per_sample), stage
        self.device_type, self._price_override, self._peak_override = device_type, usd_per_device_hour, peak_tflops
        self.max_usd, self.max_device_hours = max_usd, max_device_hours
        self.log_interval_s, self.clock = log_interval_s, clock
        self.carry = load_carry_over(carry_over)
        self._carry_given = carry_over is not None
        self.spent = Totals()  # this stage's spend; samples and flops are filled from the timestamp
        self.session = uuid.uuid4().hex[:12]
        self._resumed = False
        self._last_tick: float | None = None
        self._last_record: tuple[float, float] | None = None  # (clock, stage flops) of the previous record

    # --- Composer events -------------------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        """Resolve device, price and peak, and start this session's clock (setup time is held device time)."""
        use_cuda = state.device.name == "gpu"
        self.device_type = self.device_type or detect_device_type(use_cuda)
        spec = device_spec(self.device_type)
        per_process = torch.get_num_threads() if spec.unit == "core" else 1
        self.devices = dist.get_world_size() * per_process
        self.price = usd_per_device_hour(self.device_type, self._price_override)
        self.peak_dtype = run_dtype(state.precision)  # utilisation divides by the peak of the precision that ran
        peak = self._peak_override
        if peak is None:  # the table's peak in that precision, else (CPUs) a process's matmul peak, shared by its cores
            device = "cuda" if use_cuda else "cpu"
            peak = run_peak_tflops(device, self.peak_dtype, self.device_type)[0] / per_process
        self.peak_tflops = float(peak)
        self._last_tick = self.clock()

    def fit_start(self, state: State, logger: Logger) -> None:
        """Check a cap can checkpoint; on resume, add the spend logged after the checkpoint by the lost session."""
        if (self.max_usd or self.max_device_hours) and not any(isinstance(c, CheckpointSaver) for c in state.callbacks):
            raise ValueError("max_usd / max_device_hours stop the run with a checkpoint: configure a save_folder")
        if self._resumed:
            self._recover_lost_spend()
        self._tick(state)
        self._last_record = (self.clock(), self.stage_totals().flops)
        self._write(state, logger, "resume" if self._resumed else "start")

    def batch_end(self, state: State, logger: Logger) -> None:
        """Count the batch; record at most every log_interval_s; stop at a budget cap."""
        self._tick(state)
        over = self._over_budget()
        if over:
            state.stop_training()
            self._write(state, logger, f"budget_stop: {over}")
        elif self.clock() - self._last_record[0] >= self.log_interval_s:
            self._write(state, logger, "batch")

    def fit_end(self, state: State, logger: Logger) -> None:
        """Final record of the session."""
        self._tick(state)
        self._write(state, logger, "fit_end")

    def state_dict(self) -> dict[str, Any]:
        """Spend up to this moment (the checkpoint), the carry-over and the stage name."""
        if self._last_tick is not None:
            self._tick_spend()
        return {"stage": self.stage, "spent": self.spent.to_dict(), "carry": self.carry.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's ledger; this session's clock keeps running on top of it."""
        if state["stage"] != self.stage:
            raise ValueError(f"checkpoint ledger belongs to stage {state['stage']!r}, this callback to {self.stage!r}")
        carry = Totals.from_dict(state["carry"], "checkpoint carry-over")
        if self._carry_given and carry != self.carry:
            raise ValueError(f"carry_over {self.carry} differs from the checkpoint's {carry}; drop one of them")
        self.carry, self.spent, self._resumed = carry, Totals.from_dict(state["spent"], "checkpoint ledger"), True

    # --- bookkeeping -----------------------------------------------------------------------------------------------
    def _tick_spend(self) -> None:
        now = self.clock()
        seconds, self._last_tick = now - self._last_tick, now
        hours = seconds * self.devices / 3600
        self.spent.wall_seconds += seconds
        self.spent.device_hours += hours
        self.spent.usd += hours * self.price
        self.spent.by_device[self.device_type] = self.spent.by_device.get(self.device_type, 0.0) + hours

    def _tick(self, state: State) -> None:
        self._tick_spend()
        self.spent.samples = int(state.timestamp.sample)  # global over ranks, restored with the checkpoint
        self.spent.flops = self.spent.samples * self.flops_per_sample

    def _recover_lost_spend(self) -> None:
        found = [None]
        if dist.get_global_rank() == 0:
            mine = [r for r in read_records(self.run_dir) if r.get("stage") == self.stage]
            found[0] = mine[-1]["stage_totals"] if mine else None
        dist.broadcast_object_list(found)
        if found[0] is None:
            return
        last = Totals.from_dict(found[0], f"{self.run_dir / COST_FILE} (stage_totals)")
        lost = last.wall_seconds - self.spent.wall_seconds
        if lost <= 0:  # resumed from the newest state: nothing was logged after it
            return
        # spend only grows along a chain of sessions, so the newer record already holds the checkpoint's spend
        self.spent = Totals(last.wall_seconds, last.device_hours, last.usd, self.spent.samples, self.spent.flops,
                            last.lost_seconds + lost, dict(last.by_device))

    def stage_totals(self) -> Totals:
        """This stage's ledger so far."""
        return self.spent

    def totals(self) -> Totals:
        """The running total: carried-over stages plus this one."""
        return self.carry.plus(self.spent)

    def _over_budget(self) -> str | None:
        total = self.totals()
        if self.max_usd is not None and total.usd >= self.max_usd:
            return f"usd {total.usd:.4f} >= max_usd {self.max_usd}"
        if self.max_device_hours is not None and total.device_hours >= self.max_device_hours:
            return f"device_hours {total.device_hours:.6f} >= max_device_hours {self.max_device_hours}"
        return None

    def _write(self, state: State, logger: Logger, event: str) -> None:
        """Log metrics to every Composer logger and append one record to cost.jsonl (global rank 0)."""
        now, stage, total = self.clock(), self.stage_totals(), self.totals()
        seconds, flops_delta = now - self._last_record[0], stage.flops - self._last_record[1]
        achieved = flops_delta / seconds / self.devices / 1e12 if seconds > 0 else 0.0  # per device, TFLOP/s
        self._last_record = (now, stage.flops)
        held = stage.device_hours * 3600 * self.peak_tflops * 1e12
        metrics = {cost_key(name): value for name, value in {
            "wall_hours": stage.wall_seconds / 3600, "device_hours": stage.device_hours,
            "usd": stage.usd, "samples": stage.samples, "flops": stage.flops,
            "tflops_per_device": achieved, "mfu": achieved / self.peak_tflops,
            "stage_mfu": stage.flops / held if held > 0 else 0.0,
            "total_device_hours": total.device_hours, "total_usd": total.usd, "total_flops": total.flops,
            "total_samples": total.samples,
        }.items()}
        logger.log_metrics(metrics)
        if dist.get_global_rank() != 0:
            return
        record = {
            "time": time.time(), "event": event, "stage": self.stage, "session": self.session,
            "batch": int(state.timestamp.batch), "device_type": self.device_type, "devices": self.devices,
            "usd_per_device_hour": self.price, "peak_tflops_per_device": self.peak_tflops,
            "peak_dtype": dtype_name(self.peak_dtype),
            "flops_per_sample": self.flops_per_sample, "metrics": metrics,
            "stage_totals": stage.to_dict(), "total": total.to_dict(),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / COST_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_dtype(precision: Any) -> torch.dtype:
    """The dtype matrix products run in under a Composer precision (Precision enum or its string): fp32 or autocast."""
    name = str(getattr(precision, "value", precision)).lower()
    return {"fp32": torch.float32, "amp_fp16": torch.float16}.get(name, torch.bfloat16)
