"""The cost ledger's records: cumulative totals, and reading a run folder's cost.jsonl (no Composer needed)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..utils.jsonl import read_jsonl
from ..utils.run_folder import COST as COST_FILE
from ..utils.run_folder import config_file, cost_file


@dataclass
class Totals:
    """Cumulative spend and progress; device-hours are also kept per device type (a resume may change hardware)."""

    wall_seconds: float = 0.0
    device_hours: float = 0.0
    usd: float = 0.0
    samples: int = 0
    flops: float = 0.0
    lost_seconds: float = 0.0  # wall-clock of batches lost to an interruption and redone
    by_device: dict[str, float] = field(default_factory=dict)

    def plus(self, other: Totals) -> Totals:
        """Sum of two ledgers."""
        devices = dict(self.by_device)
        for key, hours in other.by_device.items():
            devices[key] = devices.get(key, 0.0) + hours
        sums = {k: getattr(self, k) + getattr(other, k) for k in ("wall_seconds", "device_hours", "usd", "samples",
                                                                   "flops", "lost_seconds")}
        return Totals(**sums, by_device=devices)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "totals") -> Totals:
        """Totals from a dict of the same fields; unknown or missing fields are errors naming `source`."""
        names = set(cls.__dataclass_fields__)
        if set(data) != names:
            raise ValueError(f"{source}: expected the fields {sorted(names)}, got {sorted(data)}")
        return cls(**{**data, "by_device": dict(data["by_device"])})


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run folder's cost.jsonl (empty when the file is absent)."""
    path = cost_file(run_dir)
    return read_jsonl(path) if path.exists() else []


def last_totals(run_dir: str | Path) -> tuple[Totals, Totals] | None:
    """(this stage's totals, totals with the stages it carried over) of a run's last ledger record; None without one."""
    records = read_records(run_dir)
    if not records:
        return None
    where = f"{cost_file(run_dir)} (last record)"
    return Totals.from_dict(records[-1]["stage_totals"], where), Totals.from_dict(records[-1]["total"], where)


def load_carry_over(carry_over: str | Path | dict[str, Any] | None) -> Totals:
    """Totals a stage starts from: nothing, a totals dict, or a previous run folder's last cost.jsonl record."""
    if carry_over is None:
        return Totals()
    if isinstance(carry_over, dict):
        return Totals.from_dict(carry_over, "carry_over")
    records = read_records(carry_over)
    if not records:
        raise FileNotFoundError(f"carry_over: no {COST_FILE} records in {carry_over}")
    return Totals.from_dict(records[-1]["total"], f"{cost_file(carry_over)} (last record, 'total')")


def _previous_stage(run_dir: Path) -> Path | None:
    """The run folder a stage's ledger carried over from: its recipe's runs_root/init_from (see the cost callback)."""
    config = config_file(run_dir)
    if not config.is_file():
        return None
    recipe = (yaml.safe_load(config.read_text()) or {}).get("recipe") or {}
    if not recipe.get("init_from") or recipe.get("init_checkpoint"):
        return None
    # runs_root is relative to where training ran; a sibling folder is the same stage read from elsewhere
    named = Path(recipe.get("runs_root", "runs")) / recipe["init_from"]
    return named if named.is_dir() else run_dir.parent / recipe["init_from"]


def chain_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The spend of a run and the stages its ledger carried over: each stage's last record (stage, devices,
    device-hours, dollars, FLOPs, samples) in training order, and the chained total; None without a ledger."""
    stages, here, seen = [], Path(run_dir), set()
    while here is not None and here.resolve() not in seen and read_records(here):
        seen.add(here.resolve())
        last = read_records(here)[-1]
        stage = Totals.from_dict(last["stage_totals"], f"{cost_file(here)} (last record)")
        stages.insert(0, {"stage": last["stage"], "devices": last.get("devices"),
                          "device_type": last.get("device_type"), "device_hours": stage.device_hours,
                          "usd": stage.usd, "flops": stage.flops, "samples": stage.samples})
        here = _previous_stage(here)
    if not stages:
        return None
    total = last_totals(run_dir)[1]  # the chained total: stages whose folders are gone still count
    return {"stages": stages, "total": {"device_hours": total.device_hours, "usd": total.usd, "flops": total.flops,
                                        "samples": total.samples, "wall_seconds": total.wall_seconds}}
