"""Streaming's shared memory: remove what dead processes left in /dev/shm (and their file locks), never a live run's.

Each StreamingDataset registers an integer prefix and creates `/dev/shm/{prefix:06}_{name}` for the names in
Streaming's SHM_TO_CLEAN (locals, barrier, next_epoch, ...), plus `{prefix:06}_barrier_filelock` and
`_cache_filelock` in the temp folder. Nothing in those names or in the `locals` registry records the owning process,
and a process killed with SIGKILL unlinks nothing, so its entries stay and pile up with each crash. What marks an
owner as dead is that no process maps or holds open any of the prefix's files any more (every process of a run,
loader workers included, maps them while it lives): /proc says so. Streaming's own clean_stale_shared_memory() would
unlink live runs' memory too (it unlinks every prefix from 0 up), so it is not used.

The test errs on the safe side: each new StreamingDataset maps the entries of every prefix that exists when it starts
(Streaming's prefix search opens them and keeps them open), so a dead job's entries stay while a Streaming process
started after the crash lives; the next run after it removes them.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from tempfile import gettempdir

from streaming.base.constant import SHM_TO_CLEAN  # Streaming's own list of the shared-memory names it creates

SHM_DIR = Path("/dev/shm")
FILELOCKS = ("barrier_filelock", "cache_filelock")


def _files_in_use() -> set[str]:
    """Paths that some live process maps into memory or holds open (the processes /proc lets us read)."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            with open(proc / "maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                    if len(fields) == 6:
                        used.add(fields[5].strip())
            for fd in (proc / "fd").iterdir():
                used.add(os.readlink(fd))
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue  # the process ended meanwhile, or belongs to a user whose files we could not open anyway
    return used


def _by_prefix(folder: Path, names: tuple[str, ...]) -> dict[int, list[Path]]:
    """Prefix -> this user's files `{prefix:06}_{name}` in `folder`, for the given Streaming names."""
    pattern = re.compile(r"^(\d{6})_(" + "|".join(map(re.escape, names)) + r")$")
    out: dict[int, list[Path]] = defaultdict(list)
    for path in folder.iterdir() if folder.is_dir() else ():
        m = pattern.match(path.name)
        try:
            if m is not None and path.stat().st_uid == os.getuid():
                out[int(m.group(1))].append(path)
        except FileNotFoundError:
            continue  # unlinked meanwhile
    return out


def remove_dead_leftovers(shm_dir: Path = SHM_DIR, lock_dir: str | os.PathLike | None = None) -> list[Path]:
    """Unlink this user's Streaming shared memory that no live process uses, and the unheld file locks of prefixes
    without live shared memory; return what was removed."""
    if not Path("/proc").is_dir():
        return []  # no way to tell a live owner from a dead one here (macOS): remove nothing
    shm = _by_prefix(shm_dir, tuple(SHM_TO_CLEAN))
    locks = _by_prefix(Path(lock_dir or gettempdir()), FILELOCKS)
    if not shm and not locks:
        return []
    used = _files_in_use()
    dead = {p for p, files in shm.items() if not any(str(f) in used for f in files)}
    gone = [f for p in sorted(dead) for f in shm[p]]
    gone += [f for p, files in sorted(locks.items()) if p in dead or p not in shm for f in files if str(f) not in used]
    for path in gone:
        path.unlink(missing_ok=True)  # another rank may have removed it first
    return gone
