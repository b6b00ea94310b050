"""Replace a folder or a small text file whole: a reader (or a kill) sees the old one or the new one, never a mix.

Folders (exports): the writer fills a temporary folder beside the target, `.<name>.tmp-<pid>-<random>`, then
`replace_folder` moves it into place. On Linux, renameat2(RENAME_EXCHANGE) (glibc >= 2.28, called through ctypes) swaps
the new folder with the old one in one system call, and the old one, now under the temporary name, is removed; with no
old folder a plain os.rename moves the new one in. Without renameat2 (not Linux, an older C library, or a filesystem
that refuses the exchange with ENOSYS, EINVAL or ENOTSUP, as some network filesystems do) it falls back to two renames:
target -> `<name>.old-<pid>`, then the new folder -> target. A kill between those two leaves no folder at the target and
the old one whole at `<name>.old-<pid>` (micro_diffusion.exported names it when asked to load the target); an
exception, Ctrl-C included, between them moves the old one back.

Leftovers of killed writers (only the two name patterns above, and only of processes that are no longer alive) are
removed by the next write of the same target. Files: `write_text_atomic` writes a temporary file beside the target,
fsyncs it and os.replace()s it over the target.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError

AT_FDCWD = -100  # renameat2's "relative to the current folder" (linux/fcntl.h)
RENAME_EXCHANGE = 2  # swap the two names (linux/fs.h)
UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}  # no exchange here: use the fallback
_LIBC: ctypes.CDLL | None = None


def _libc_renameat2():
    """The C library's renameat2, or None (not Linux, or a C library without it)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return None
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_LIBC, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags); OSError(ENOSYS) when the C library lacks it."""
    fn = _libc_renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here", str(src))
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one system call; False (nothing changed) where renameat2 cannot exchange."""
    try:
        _renameat2(a, b, RENAME_EXCHANGE)
    except OSError as err:
        if err.errno in UNSUPPORTED:
            return False
        raise
    return True


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root, so a rename publishes data already on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def temp_name(target: Path) -> Path:
    """A fresh temporary path beside target, in the one pattern leftover cleaning removes."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def old_name(target: Path) -> Path:
    """Where the fallback parks the old folder between its two renames."""
    return target.with_name(f"{target.name}.old-{os.getpid()}")


def _alive(pid: int) -> bool:
    """True when a process with this id exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # ended, or an id no process can have
        return False
    except PermissionError:
        return True
    return True


def leftovers(target: Path) -> list[Path]:
    """Temporary and parked-old paths of target left by writers no longer alive (only names this module makes)."""
    name = re.escape(target.name)
    pattern = re.compile(rf"^(?:\.{name}\.tmp-(\d+)-[0-9a-f]{{8}}|{name}\.old-(\d+))$")
    if not target.parent.is_dir():
        return []
    found = []
    for entry in os.scandir(target.parent):
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(1) or m.group(2))):
            found.append(Path(entry.path))
    return sorted(found)


def parked(target: Path) -> list[Path]:
    """Old folders the fallback parked beside target (`<name>.old-<pid>`) and a kill left there."""
    return [p for p in leftovers(target) if p.name.startswith(f"{target.name}.old-")]


def remove(path: Path) -> None:
    """Remove a file or folder this module made; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(tmp: str | Path, target: str | Path) -> str:
    """Move the finished folder tmp to target, replacing a folder there whole; returns the mechanism used.

    "rename": no folder was there; "exchange": renameat2(RENAME_EXCHANGE), then the old one is removed; "fallback":
    target -> <name>.old-<pid>, tmp -> target, then the old one is removed (a kill between the two renames leaves
    the old folder whole at <name>.old-<pid> and nothing at target).
    """
    tmp, target = Path(tmp), Path(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return "rename"
    if exchange(tmp, target):
        fsync_dir(target.parent)
        remove(tmp)  # the old folder, now under the temporary name
        return "exchange"
    old = old_name(target)
    remove(old)  # a stale one of an earlier process with this id
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if not os.path.lexists(target):
            os.rename(old, target)  # put the old one back: an interrupted export leaves what was there
        raise
    fsync_dir(target.parent)
    remove(old)
    return "fallback"


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside target; when the block ends normally it replaces target whole.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and target is left as it was.
    A symlinked target is followed: the folder it points to is replaced.
    """
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file, not a folder: choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in leftovers(target):
        if not stale.name.startswith(f"{target.name}.old-") or target.exists():
            remove(stale)  # keep a parked old folder while nothing else is at target: it is the only copy
    tmp = temp_name(target)
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, target)
    finally:
        remove(tmp)  # a no-op after a replace that moved it; the old folder after an exchange
    for stale in parked(target):
        remove(stale)  # the new folder is in place: a parked old one of a killed writer is replaced too


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write text to path through a temporary file beside it (fsynced, then os.replace): old or new, never a part."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)  # the rename survives a power cut, not only a kill
    return path
