"""JSON-lines files: one record per line (cost ledgers, metrics, rejected inputs, prompt sets)."""
from __future__ import annotations

import json
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
