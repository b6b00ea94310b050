"""Shard integrity: every shard file's size (always, cheap) and hash (on request) against its MDS index.

precompute and convert ask Streaming's MDSWriter for SHARD_HASHES, which it records per shard in index.json
(`raw_data: {"basename", "bytes", "hashes": {"xxh64": ...}}`). A truncated copy fails the size check; bit rot in the
middle of a shard keeps the size and fails the hash check. Each problem is one line naming the file, what the index
expects and what was found, and how to repair it. Light on purpose (no Streaming import): the recipe checks, the
`data verify` command and data_prep use it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import xxhash

from micro_diffusion.data.schema import index_shards
from micro_diffusion.errors import DataError

SHARD_HASH = "xxh64"  # fast (several GB/s) and recorded by Streaming's own writer
SHARD_HASHES = [SHARD_HASH]  # the `hashes=` argument precompute and convert give MDSWriter
VERIFY_MODES = ("size", "hashes")  # data.verify: the size check always runs; "hashes" adds the hash check
_READ = 1 << 22  # bytes per read while hashing


class DamagedShardError(DataError, RuntimeError):
    """Shard files that do not match their index (missing, truncated, corrupted): one line per damaged file."""


def file_hash(path: Path, algo: str) -> str:
    """Hex digest of a file, read in blocks (Streaming's names: xxh64, xxh3_64, sha1, md5, ...)."""
    h = getattr(xxhash, algo)() if algo in xxhash.algorithms_available else hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ), b""):
            h.update(block)
    return h.hexdigest()


def repair_hint(root: Path, remote: str | None = None) -> str:
    """How to repair a damaged shard of the dataset at `root`: rerun the step that wrote it, or fetch it again."""
    if remote is not None:
        return f"delete it from the cache; Streaming downloads it again from {remote}"
    for step, options in (("precompute", "precompute_options.json"), ("convert", "convert_options.json")):
        if (root / options).is_file():
            return (f"rerun the same `python -m data_prep.{step}` command (its options are in {root / options}) with "
                    "--verify-hashes: it rewrites every chunk that fails its check")
    return "copy it again from where the dataset came from, or write the dataset again"


def _check_file(path: Path, info: Mapping[str, Any], hashes: bool) -> str | None:
    """What is wrong with one shard file against its index entry, or None."""
    if not path.is_file():
        return f"expected {info.get('bytes')} bytes, found no file"
    size = path.stat().st_size
    if info.get("bytes") is not None and size != int(info["bytes"]):
        return f"expected {info['bytes']} bytes, found {size} (truncated or overwritten)"
    if not hashes:
        return None
    recorded = info.get("hashes") or {}
    if not recorded:
        return "the index records no hash for it (written without hashes: write the dataset again to verify it)"
    algo = SHARD_HASH if SHARD_HASH in recorded else sorted(recorded)[0]
    found = file_hash(path, algo)
    if found != recorded[algo]:
        return f"expected {algo} {recorded[algo]}, found {found} (corrupted)"
    return None


def check_folder(root: str | os.PathLike, hashes: bool = False, remote: str | None = None) -> list[str]:
    """One line per damaged shard of the MDS dataset at `root` ([] when all check).

    With a `remote`, `root` is a download cache: shards not cached yet are not checked (Streaming fetches them).
    """
    root = Path(root)
    try:
        index, shards = index_shards(root)
    except ValueError as err:
        return [f"{err}: {repair_hint(root, remote)}"]
    problems = []
    for info in shards:
        raw, zipped = info.get("raw_data") or {}, info.get("zip_data") or {}
        entry = raw if raw and (root / raw["basename"]).is_file() or not zipped else zipped
        if not entry.get("basename"):
            problems.append(f"{index}: a shard entry names no file: {repair_hint(root, remote)}")
            continue
        path = root / entry["basename"]
        if remote is not None and not path.is_file():
            continue
        wrong = _check_file(path, entry, hashes)
        if wrong:
            problems.append(f"damaged shard {path}: {wrong}; {repair_hint(root, remote)}")
    return problems


def check_streams(streams: Sequence[Mapping[str, Any]], verify: str = "size") -> None:
    """Check every stream's local shards ({"local", "remote"} dicts); raise DamagedShardError listing the damage."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    problems = []
    for s in streams:
        local, remote = s.get("local"), s.get("remote")
        if local is None or (remote is not None and not (Path(local) / "index.json").is_file()):
            continue  # nothing cached yet: Streaming downloads (and checks) what it needs
        problems += check_folder(local, hashes=verify == "hashes", remote=remote)
    if problems:
        raise DamagedShardError("\n".join(problems))
