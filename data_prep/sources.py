"""What every adapter shares: the Record it yields, SourceError, and reading archives in place.

`input_paths` turns an INPUT into the archive files it names (one file, a folder, brace patterns, shell globs);
`tar_files` streams the files of a tar of any compression without unpacking it to disk, so a truncated archive costs
only its damaged tail.
"""
from __future__ import annotations

import glob
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from micro_diffusion.errors import MicroDiffusionError


class SourceError(MicroDiffusionError):
    """The input as a whole cannot be read (wrong path, malformed annotation file): the run stops (exit 1)."""


@dataclass(frozen=True)
class Record:
    """One input: where it came from, its id, its image (bytes or a file path) and its caption (text, bytes or .txt).

    `reject` is set when the adapter already knows the input is unusable ("reason" or "reason: detail", e.g. a tar cut
    off mid-member, an image without a caption, an NSFW-flagged row).
    """

    source: str
    id: str | None
    image: bytes | Path | None
    caption: str | bytes | Path | None
    reject: str | None = None


_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_GLOB_RE = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset brace patterns: `a{000..002}.tar` -> a000.tar a001.tar a002.tar, `{x,y}` -> x y."""
    m = _BRACE_RE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def is_pattern(text: str) -> bool:
    """True when INPUT is a brace pattern or a shell glob rather than one path."""
    return "{" in text or bool(_GLOB_RE.search(text))


def input_paths(input: str | Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Archive files named by INPUT, in a fixed order.

    One file; a folder (its files ending in `suffixes`, sorted); or a pattern: braces are expanded first
    (`{00000..00099}.tar`: every expansion must exist), then shell globs (`sa_*.tar`, `**`: each must match at least
    one file, matches sorted). A file named twice is read once.
    """
    text = str(input)
    if is_pattern(text):
        paths, missing = [], []
        for pattern in expand_braces(text):
            if _GLOB_RE.search(pattern):
                matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
                if not matches:
                    raise SourceError(f"INPUT {text}: no file matches {pattern}")
                paths += matches
            elif Path(pattern).is_file():
                paths.append(Path(pattern))
            else:
                missing.append(pattern)
        if missing:
            raise SourceError(f"INPUT {text}: {len(missing)} expanded {what}(s) missing, first {missing[0]}")
        return list(dict.fromkeys(paths))
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise SourceError(f"INPUT {text}: no {' or '.join(suffixes)} files in this folder")
        return files
    raise SourceError(f"INPUT {text}: no such file or folder")


# What a damaged tar, gzip or bzip2 stream raises while it is read sequentially.
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def tar_files(path: Path) -> Iterator[tuple[str, bytes | None, str | None]]:
    """The regular files of a tar (.tar, .tgz, ...) in archive order, streamed: (name, data, None) each.

    A damaged archive ends the stream with one (name of the member being read, or "" if its header was the damaged
    part, None, error text); the files before the damage have been yielded whole.
    """
    name = ""
    try:
        with tarfile.open(path, "r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                name = info.name
                data = tf.extractfile(info).read()
                yield name, data, None
                name = ""
    except ARCHIVE_ERRORS as e:
        yield name, None, f"{type(e).__name__}: {e}"


def member_stem(name: str) -> tuple[str, str]:
    """(stem, lower-case extension) of an archive member's basename: `./a/sa_1.jpg` -> (`sa_1`, `jpg`)."""
    base = name.rsplit("/", 1)[-1]
    stem, _, ext = base.rpartition(".")
    return (stem, ext.lower()) if stem else (base, "")
