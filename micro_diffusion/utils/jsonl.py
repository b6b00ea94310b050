"""JSON-lines files: one record per line (cost ledgers, metrics, rejected inputs, prompt sets)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file; a malformed line is an error naming the file and line."""
    path, records = Path(path), []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON record ({err.msg})") from err
    return records


def superseded_path(path: str | Path) -> Path:
    """Where `supersede_from` moves a log's superseded records (`metrics.jsonl` -> `metrics.superseded.jsonl`)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.superseded{path.suffix}")


def supersede_from(path: str | Path, step: int, note: str) -> list[dict[str, Any]]:
    """Keep the records of a step-keyed log with step < `step`; move those after it, and any torn (unparseable)
    line, to `superseded_path(path)`, each marked with `note`; return the records at exactly `step`, also removed.

    A resumed run calls this with the batch it resumed from: what a killed process logged after its last
    checkpoint is logged again by the resumed one, so each step appears once.
    """
    path = Path(path)
    if not path.is_file():
        return []
    kept, moved, at_step = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            row_step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            moved.append({"superseded": f"{note}: torn line", "line": line})
            continue
        if row_step < step:
            kept.append(line)
        elif row_step == step:
            at_step.append(record)
        else:
            moved.append({"superseded": note, **record})
    if not moved and not at_step:
        return []
    if moved:
        with open(superseded_path(path), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in moved)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)  # readers see the old log or the new one, never a part
    return at_step
