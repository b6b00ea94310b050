"""`micro-diffusion data verify DIR [DIR ...]`: every shard's size and hash against its MDS index.

Exit codes: 0 when every shard checks, 1 when any is damaged (one line each, naming the file, what was expected and
found, and how to repair it), 2 on bad usage (a folder without an index.json).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from micro_diffusion.data.integrity import check_folder
from micro_diffusion.data.schema import index_shards
from micro_diffusion.errors import UsageError

VERIFY_OK, VERIFY_DAMAGED, VERIFY_USAGE = 0, 1, 2


@dataclass(frozen=True)
class FolderCheck:
    """One dataset folder's check: how many shards its index lists and one line per damaged shard."""

    folder: Path
    shards: int
    problems: list[str]


def verify(folders: Sequence[str | Path], hashes: bool = True) -> list[FolderCheck]:
    """Check each folder's shards (size, then hash unless hashes=False); UsageError for a folder without an index."""
    folders = [Path(f) for f in folders]
    for folder in folders:
        if not (folder / "index.json").is_file():
            raise UsageError(f"no MDS index at {folder / 'index.json'}")
    checks = []
    for folder in folders:
        problems = check_folder(folder, hashes=hashes)
        try:
            shards = len(index_shards(folder)[1])
        except ValueError:
            shards = 0
        checks.append(FolderCheck(folder, shards, problems))
    return checks
