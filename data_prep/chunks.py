"""Resumable chunked MDS writing: one sub-directory per chunk, an atomic done-marker, one merged index.

Why this design: a long conversion must survive kill -9 without losing or duplicating samples. Inputs are taken in
a deterministic order and cut into fixed-size chunks; chunk k is written as a complete MDS dataset in
`ROOT/part-{k:05d}/`. Only after its writer has finished (shards and its own index.json on disk, fsynced) is the
marker `ROOT/part-{k:05d}.done` written atomically (temp file + fsync + rename). The marker carries whatever the caller
must commit together with the chunk (counts, rejected lines), so these can never disagree with the shards. On a re-run,
a chunk with a marker is skipped, and a chunk directory without one is deleted and written again. At the end the
per-chunk indexes are merged into `ROOT/index.json` with streaming's `merge_index`, which StreamingDataset reads as one
dataset.

The marker lives beside the chunk directory, not in it, so that streaming's own "merge every json below ROOT" mode
would never mistake it for a shard index.

Typical use:

    for k, items in enumerate_chunks(inputs, chunk_size):
        if is_done(root, k):
            continue
        part = start_chunk(root, k)                # fresh, empty ROOT/part-0000k/
        with MDSWriter(out=str(part), columns=...) as w:
            ...
        mark_done(root, k, {"written": n, "rejected": [...]})
    merge_chunks(root)                             # ROOT/index.json
    payloads = [read_done(root, k) for k in done_chunks(root)]
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from micro_diffusion.data.integrity import check_folder
from micro_diffusion.errors import MicroDiffusionError
from micro_diffusion.utils.atomic import fsync_dir, write_text_atomic

T = TypeVar("T")

_PART_RE = re.compile(r"^part-(\d{5,})$")
_DONE_RE = re.compile(r"^part-(\d{5,})\.done$")
# write_text_atomic's temporary marker (`.part-00000.done.tmp-<pid>-<hex>`), or the `part-00000.done.tmp` of outputs
# written before it
_STRAY_MARKER_RE = re.compile(r"^(?:\.part-\d{5,}\.done\.tmp-\d+-[0-9a-f]{8}|part-\d{5,}\.done\.tmp)$")


def chunk_dir(root: str | os.PathLike, index: int) -> Path:
    """Directory holding chunk `index` (`ROOT/part-00000`)."""
    return Path(root) / f"part-{index:05d}"


def done_path(root: str | os.PathLike, index: int) -> Path:
    """Done-marker file of chunk `index` (`ROOT/part-00000.done`)."""
    return Path(root) / f"part-{index:05d}.done"


def enumerate_chunks(items: Iterable[T], size: int) -> Iterator[tuple[int, list[T]]]:
    """Yield (chunk index, list of up to `size` items) over `items` in order; the last chunk may be shorter."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    it = iter(items)
    for index in itertools.count():
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield index, batch


def is_done(root: str | os.PathLike, index: int) -> bool:
    """True when chunk `index` has its done marker (its shards are complete)."""
    return done_path(root, index).is_file()


def read_done(root: str | os.PathLike, index: int) -> dict[str, Any]:
    """The payload that `mark_done` committed for chunk `index`."""
    path = done_path(root, index)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ResumeOptionsError(MicroDiffusionError, ValueError):
    """An output folder written with other options than the command's: resuming there would mix two outputs (exit 1)."""


def check_resume_options(root: str | os.PathLike, file_name: str, options: dict[str, Any]) -> None:
    """Record the options that shape a resumable output on first use; refuse to resume with different ones."""
    root = Path(root)
    path = root / file_name
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in options.items() if before.get(k) != v}
        if changed:
            raise ResumeOptionsError(f"{root} holds output written with other options {changed} (was, now); rerun "
                                     "the same command to resume, or use a new output folder")
        return
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ResumeOptionsError(f"{root}: folder is not empty and holds no {file_name}; use a new folder")
    write_text_atomic(path, json.dumps(options, indent=1))


def start_chunk(root: str | os.PathLike, index: int) -> Path:
    """Return an empty directory for chunk `index`, deleting any partial output a killed run left there."""
    if is_done(root, index):
        raise RuntimeError(f"chunk {index} in {root} is already done; refusing to overwrite it")
    part = chunk_dir(root, index)
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    return part


def mark_done(root: str | os.PathLike, index: int, payload: dict[str, Any]) -> None:
    """Commit chunk `index`: fsync its files, then atomically write its marker holding `payload` (JSON-able)."""
    part = chunk_dir(root, index)
    if not (part / "index.json").is_file():
        raise RuntimeError(f"chunk directory {part} has no index.json; finish its MDSWriter before mark_done")
    for file in part.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(part)
    write_text_atomic(done_path(root, index), json.dumps(payload))


def done_chunks(root: str | os.PathLike) -> list[int]:
    """Indices of all chunks with a done marker, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_DONE_RE.match(p.name) for p in root.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def remove_unfinished(root: str | os.PathLike) -> list[Path]:
    """Delete chunk directories (and stray temp markers) without a done marker; return what was deleted."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        m = _PART_RE.match(p.name)
        if m and p.is_dir() and not is_done(root, int(m.group(1))):
            shutil.rmtree(p)
            removed.append(p)
        elif _STRAY_MARKER_RE.match(p.name):  # a marker write that a kill interrupted
            p.unlink()
            removed.append(p)
    return removed


def drop_damaged(root: str | os.PathLike, hashes: bool = False) -> list[str]:
    """Un-commit every done chunk whose shards fail their size (and, with `hashes`, hash) check, so that a re-run
    writes it again; return one line per chunk dropped, naming what was wrong."""
    dropped = []
    for k in done_chunks(root):
        part = chunk_dir(root, k)
        problems = check_folder(part, hashes=hashes) if (part / "index.json").is_file() else [f"{part}: no index"]
        if problems:
            done_path(root, k).unlink()
            shutil.rmtree(part, ignore_errors=True)
            dropped.append(f"chunk {k} ({part}) is damaged and is written again: {problems[0].split(';')[0]}")
    return dropped


def merge_chunks(root: str | os.PathLike) -> Path:
    """Merge the index.json of every done chunk into ROOT/index.json (readable by StreamingDataset); return its path.

    Markers without their directory mean someone deleted shards by hand: that is an error, not something to skip.
    """
    from streaming.base.util import merge_index

    root = Path(root)
    indexes = []
    for k in done_chunks(root):
        index_file = chunk_dir(root, k) / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"chunk {k} is marked done but {index_file} is missing; delete "
                                    f"{done_path(root, k)} to redo that chunk")
        indexes.append(str(index_file))
    merged = root / "index.json"
    # merge_index moves its result into ROOT and refuses to replace an existing file.
    merged.unlink(missing_ok=True)
    if indexes:
        # merge_index logs a warning about its temp folder and the existing ROOT on every call: routine, not news.
        logging.disable(logging.WARNING)
        try:
            merge_index(indexes, str(root))
        finally:
            logging.disable(logging.NOTSET)
    else:
        write_text_atomic(merged, json.dumps({"version": 2, "shards": []}))
    return merged
