"""The cost ledger's records: cumulative totals, and reading a run folder's cost.jsonl (no Composer needed)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils.jsonl import read_jsonl
from ..utils.run_folder import COST as COST_FILE
from ..utils.run_folder import cost_file


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
