"""The download's network and disk steps: one fetch (temp file, then rename), its errors as one line, tidy failures.

A network error (refused connection, HTTP error, timeout, reset) becomes a `DownloadError` naming the URL and what to
rerun; the temp file is removed. `no_empty_folders` removes, after a failure, the folders the failed block created and
left empty, so a run that fetched nothing leaves nothing behind.
"""
from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from micro_diffusion.errors import MicroDiffusionError

TIMEOUT_S = 60  # per connection attempt and per read: a stalled server fails instead of hanging
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


class DownloadError(MicroDiffusionError):
    """A dataset that cannot be planned or fetched as asked (network, no manifest, no token, a missing tool): exit 1."""


def network_reason(err: BaseException) -> str:
    """What went wrong, in a few words: 'HTTP 500 Internal Server Error', 'Connection refused', 'timed out'."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        return getattr(reason, "strerror", None) or str(reason)
    return str(err) or type(err).__name__


def fetch(url: str, dest: Path, token: bool = False) -> None:
    """Download url to dest (skipped if present), via a temp file beside it renamed when complete: a killed or failed
    download never leaves a partial file under the target's name, and a failure leaves no temp file."""
    if dest.exists():
        return
    req = urllib.request.Request(url)
    if token:
        if not os.environ.get("HF_TOKEN"):
            raise DownloadError(f"{url} is gated: set HF_TOKEN after accepting the dataset's terms")
        req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        os.replace(tmp, dest)
    except NETWORK_ERRORS as err:
        raise DownloadError(f"could not fetch {url} ({network_reason(err)}): check the network or the host, then "
                            "rerun the same command (files already fetched are kept)") from None
    finally:
        tmp.unlink(missing_ok=True)


def _folders(root: Path) -> set[Path]:
    """Every folder under root, root included (empty if root does not exist)."""
    if not root.is_dir():
        return set()
    return {root, *(Path(d) / n for d, names, _ in os.walk(root) for n in names)}


@contextmanager
def no_empty_folders(root: Path) -> Iterator[None]:
    """On an exception, remove the folders under root (and root's missing parents) that the block created and left
    empty, deepest first; folders that were there before, and any that hold a file, stay."""
    root = Path(root)
    missing = [p for p in (root, *root.parents) if not p.exists()]  # root's chain this block may create
    before = _folders(root)
    try:
        yield
    except BaseException:
        created = sorted((_folders(root) - before) | {p for p in missing if p.is_dir()},
                         key=lambda p: len(p.parts), reverse=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):  # only an empty folder goes
                folder.rmdir()
        raise
