"""One small adapter per source format: each yields Records in a deterministic order; convert does the rest.

An adapter checks its input eagerly (a wrong path raises SourceError before anything is written) and then yields
lazily. Records carry either the image bytes (tar, parquet) or the path (folder, COCO) so that the worker processes
do the reading and decoding.
"""
from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.images import IMAGE_EXTENSIONS


class SourceError(Exception):
    """The input as a whole cannot be read (wrong path, malformed annotation file): the run stops."""


@dataclass(frozen=True)
class Record:
    """One input: where it came from, its id, its image (bytes or a file path) and its caption (text, bytes or .txt).

    `reject` is set when the adapter already knows the input is unusable (e.g. a tar cut off mid-member).
    """

    source: str
    id: str | None
    image: bytes | Path | None
    caption: str | bytes | Path | None
    reject: str | None = None


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    """Map relative file path -> caption from a captions.jsonl; a malformed line is an error naming file and line."""
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                file, caption = entry["file"], entry["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"{path}:{n}: expected {{\"file\": ..., \"caption\": ...}}, got {line.strip()[:80]!r}"
                                  f" ({type(e).__name__}: {e})") from e
            captions[Path(file).as_posix()] = caption
    return captions


def folder_records(input: Path) -> Iterator[Record]:
    """Image files under `input` (recursive, sorted), captioned by captions.jsonl if listed there, else by KEY.txt."""
    if not input.is_dir():
        raise SourceError(f"--input {input}: not a directory (format folder needs a folder of images)")
    jsonl = input / "captions.jsonl"
    listed = _read_captions_jsonl(jsonl) if jsonl.is_file() else {}
    files = {p.relative_to(input).as_posix() for p in input.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()}

    def gen() -> Iterator[Record]:
        # Files named in captions.jsonl but absent on disk are inputs too: they end up rejected as unreadable.
        for rel in sorted(files | listed.keys()):
            path = input / rel
            caption = listed[rel] if rel in listed else path.with_suffix(".txt")
            yield Record(str(path), str(Path(rel).with_suffix("").as_posix()), path, caption)

    return gen()


def coco_records(input: Path, annotations: Path | None, all_captions: bool = False) -> Iterator[Record]:
    """COCO caption annotations: one record per image (lowest annotation id) or, with all_captions, per caption."""
    if not input.is_dir():
        raise SourceError(f"--input {input}: not a directory (format coco needs the images folder)")
    if annotations is None:
        raise SourceError("format coco needs --annotations (e.g. annotations/captions_val2014.json)")
    if not annotations.is_file():
        raise SourceError(f"--annotations {annotations}: no such file")
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        images = {int(im["id"]): im["file_name"] for im in data["images"]}
        anns = sorted((int(a["id"]), int(a["image_id"]), a["caption"]) for a in data["annotations"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"--annotations {annotations}: not a COCO captions file ({type(e).__name__}: {e})") from e
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann_id, image_id, caption in anns:
        by_image.setdefault(image_id, []).append((ann_id, caption))

    def gen() -> Iterator[Record]:
        for image_id in sorted(images.keys() | by_image.keys()):
            name = images.get(image_id)
            path = input / name if name is not None else None
            source = str(path) if path is not None else f"{annotations}#image_id={image_id}"
            caps = by_image.get(image_id, [])
            reject = None if name is not None else "image_not_in_annotations"
            if not caps:
                yield Record(source, str(image_id), path, None, reject)
            elif all_captions:
                for ann_id, caption in caps:
                    yield Record(source, f"{image_id}_{ann_id}", path, caption, reject)
            else:
                yield Record(source, str(image_id), path, caps[0][1], reject)

    return gen()


_BRACE_RE = re.compile(r"\{([^{}]*)\}")


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


def _tar_paths(input: str) -> list[Path]:
    """Tars named by --input: one tar, a folder of tars (sorted), or a brace pattern (every file must exist)."""
    if "{" in input:
        paths = [Path(p) for p in expand_braces(input)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"--input {input}: {len(missing)} expanded tar(s) missing, first {missing[0]}")
        return paths
    path = Path(input)
    if path.is_file():
        return [path]
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise SourceError(f"--input {input}: no .tar files in this folder")
        return tars
    raise SourceError(f"--input {input}: no such file or folder")


_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _group_record(tar: Path, key: str, members: dict[str, bytes]) -> Record:
    """Turn the members of one webdataset key into a Record (image + caption)."""
    source = f"{tar}::{key}"
    image_ext = next((e for e in _WDS_IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return Record(source, key, None, members.get("txt"), reject="missing_image")
    return Record(f"{tar}::{key}.{image_ext}", key, members[image_ext], members.get("txt"))


def _tar_records(tar: Path) -> Iterator[Record]:
    """Read one tar sequentially, grouping consecutive members by key (the name up to the basename's first dot)."""
    key, members, this_key = None, {}, None
    try:
        with tarfile.open(tar, "r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                head, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                this_key = f"{head}/{stem}" if head else stem
                data = tf.extractfile(info).read()
                if this_key != key and key is not None:
                    yield _group_record(tar, key, members)
                    members = {}
                key = this_key
                members[ext.lower()] = data
            this_key = None
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated tar: complete keys before the damage are kept; the damaged tail is one rejected input.
        if key is not None and this_key != key:
            yield _group_record(tar, key, members)
        yield Record(str(tar), None, None, None, reject=f"corrupt_tar: {type(e).__name__}: {e}")
        return
    if key is not None:
        yield _group_record(tar, key, members)


def webdataset_records(input: str) -> Iterator[Record]:
    """Records from webdataset tars (KEY.jpg + KEY.txt [+ KEY.json]) as img2dataset writes them."""
    tars = _tar_paths(input)

    def gen() -> Iterator[Record]:
        for tar in tars:
            yield from _tar_records(tar)

    return gen()


def _parquet_value(value: object) -> bytes | None:
    """An image cell: raw bytes or a {"bytes": ...} struct, as img2dataset and Hugging Face write them."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, type(None))) else None


def parquet_records(input: str) -> Iterator[Record]:
    """Records from img2dataset parquet files with an image column (jpg/image) and a caption column (caption/txt)."""
    import pyarrow.parquet as pq  # imported here: only parquet sources pay for it
    path = Path(input)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise SourceError(f"--input {input}: no such parquet file or folder of .parquet files")
    schemas = {f: pq.ParquetFile(f).schema_arrow.names for f in files}
    for f, names in schemas.items():
        if not {"jpg", "image"} & set(names) or not {"caption", "txt"} & set(names):
            raise SourceError(f"{f}: needs an image column (jpg or image) and a caption column (caption or txt); "
                              f"has {names}")

    def gen() -> Iterator[Record]:
        for f, names in schemas.items():
            img_col = "jpg" if "jpg" in names else "image"
            cap_col = "caption" if "caption" in names else "txt"
            key_col = "key" if "key" in names else None
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                for item in batch.to_pylist():
                    key = str(item[key_col]) if key_col else f"{f.stem}/{row:09d}"
                    yield Record(f"{f}#row={row}", key, _parquet_value(item[img_col]), item[cap_col])
                    row += 1

    return gen()


FORMATS: dict[str, Callable[..., Iterator[Record]]] = {
    "folder": folder_records,
    "coco": coco_records,
    "webdataset": webdataset_records,
    "parquet": parquet_records,
}
