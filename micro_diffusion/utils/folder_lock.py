"""One writer per folder: an advisory lock that `train`, `distill`, `export`, convert, precompute and `eval coco` hold.

`hold(folder, what)` takes an exclusive `flock` on the folder's lock file (run_folder.LOCK, or beside the folder with
`beside=True`, for folders that are replaced whole by a rename) without waiting; a second job on the same folder gets
`Busy` at once, naming the holder's host, pid and command, which the holder wrote into the lock file as JSON. The
kernel releases the lock when its process dies, however it dies: a lock file left by `kill -9` only holds a stale
record, which the next holder overwrites. A clean release removes the lock file (and any folder `hold` created that is
still empty). Under a distributed launcher (Composer's, torchrun) only global rank 0 (the RANK variable) takes the
lock, for the whole job; the other ranks hold nothing.

On NFS, Linux emulates `flock` with the server's byte-range locks, so the lock holds across hosts that mount the
folder; on filesystems without locking the job fails at once with one line (MicroDiffusionError, exit 1) that
names the lock file and the OSError of `flock`.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from micro_diffusion.errors import Busy, MicroDiffusionError
from micro_diffusion.utils.run_folder import lock_file

_ATTEMPTS = 20  # re-opens when the lock file was removed or replaced between our open and our lock


def holder(path: str | os.PathLike) -> dict[str, Any]:
    """The record a lock file holds: host, pid, command, what and since ({} when unreadable or not written yet)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _busy(folder: Path, path: Path, what: str) -> Busy:
    """The error a second job gets: who holds the folder, and what to do."""
    rec = holder(path)
    if not rec:
        who = "another process (its record in the lock file is not written yet)"
    else:
        here = " (this host)" if rec.get("host") == socket.gethostname() else ""
        who = (f"{rec.get('what', 'a job')} pid {rec.get('pid')} on host {rec.get('host')}{here} since "
               f"{rec.get('since')}: {rec.get('command')!r}")
    return Busy(f"{folder} is in use by {who}; cannot {what} there at the same time: wait for that job to finish or "
                f"stop it, or choose another folder (lock file {path})")


def _created_dirs(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, deepest first."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _record(what: str) -> bytes:
    """This process's JSON record: host, pid, command, what and since."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
                       "what": what, "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
                      ).encode() + b"\n"


def _acquire(folder: Path, path: Path, what: str) -> int:
    """An open descriptor of `path` holding its exclusive lock; raise Busy when another process holds it."""
    for _ in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy(folder, path, what) from None
            raise
        try:  # the holder before us may have removed (and a third job re-created) the file since our open
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise Busy(f"{folder}: its lock file {path} keeps being replaced by other jobs; retry when they are done")


def _global_rank() -> int:
    """This process's global rank under a distributed launcher (0 when launched alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def hold(folder: str | os.PathLike, what: str, beside: bool = False) -> Iterator[Path | None]:
    """Hold `folder`'s lock while the block runs (its lock file; None on ranks other than 0); raise Busy when taken.

    beside: lock `<parent>/.<name>` + LOCK next to the folder, for a folder replaced whole (an export) or one whose
    contents are checked (a convert or precompute output must hold only its own files)."""
    if _global_rank() != 0:
        yield None
        return
    folder = Path(folder)
    path = lock_file(folder, beside)
    created: list[Path] = []
    try:
        created = _created_dirs(path.parent)
        fd = _acquire(folder, path, what)
    except BaseException as err:
        _remove_empty(created)
        if isinstance(err, OSError):
            raise MicroDiffusionError(f"{folder}: cannot {what} there, its lock file {path} cannot be written "
                                      f"({type(err).__name__}: {err}); choose a folder you can write") from err
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _record(what))
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a job that opened the old file sees it gone and re-opens
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders `hold` created that are still empty (a job that failed early leaves nothing new)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def holding(what: str, folder_arg: str = "out", beside: bool = False) -> Callable[[Callable], Callable]:
    """Decorate a step function so it runs holding the lock of its `folder_arg` argument's folder (see hold)."""
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with hold(signature.bind(*args, **kwargs).arguments[folder_arg], what, beside):
                return fn(*args, **kwargs)
        return locked
    return decorate
