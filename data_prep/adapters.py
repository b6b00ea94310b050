"""One small adapter per source format: each yields Records in a deterministic order; convert does the rest.

An adapter checks its input eagerly (a wrong path raises SourceError before anything is written) and then yields
lazily. Records carry either the image bytes (archives, parquet) or the path (folder, COCO) so that the worker
processes do the reading and decoding. The generic formats live here; the sources read in their publishers' own
layouts (SA-1B, JourneyDB, DiffusionDB) live in data_prep/publishers.py. FORMATS is the one registry of both.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep import publishers
from data_prep.images import IMAGE_EXTENSIONS
from data_prep.sources import Record, SourceError, input_paths, tar_files

__all__ = ["FORMATS", "Format", "Record", "SourceError"]


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


def folder_records(input: str | Path) -> Iterator[Record]:
    """Image files under `input` (recursive, sorted), captioned by captions.jsonl if listed there, else by KEY.txt."""
    input = Path(input)
    if not input.is_dir():
        raise SourceError(f"INPUT {input}: not a directory (format folder needs a folder of images)")
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


def coco_records(input: str | Path, annotations: Path | None = None, all_captions: bool = False
                 ) -> Iterator[Record]:
    """COCO caption annotations: one record per image (lowest annotation id) or, with all_captions, per caption."""
    input = Path(input)
    if not input.is_dir():
        raise SourceError(f"INPUT {input}: not a directory (format coco needs the images folder)")
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
    key, members = None, {}
    for name, data, error in tar_files(tar):
        head, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        this_key = (f"{head}/{stem}" if head else stem) if name else key
        if error is not None:
            # A truncated tar: complete keys before the damage are kept; the damaged tail is one rejected input.
            if key is not None and this_key != key:
                yield _group_record(tar, key, members)
            yield Record(str(tar), None, None, None, reject=f"corrupt_tar: {error}")
            return
        if this_key != key and key is not None:
            yield _group_record(tar, key, members)
            members = {}
        key = this_key
        members[ext.lower()] = data
    if key is not None:
        yield _group_record(tar, key, members)


WEBDATASET_SUFFIXES = (".tar",)


def webdataset_records(input: str | Path) -> Iterator[Record]:
    """Records from webdataset tars (KEY.jpg + KEY.txt [+ KEY.json]) as img2dataset writes them."""
    tars = input_paths(input, WEBDATASET_SUFFIXES, "tar")

    def gen() -> Iterator[Record]:
        for tar in tars:
            yield from _tar_records(tar)

    return gen()


def _parquet_value(value: object) -> bytes | None:
    """An image cell: raw bytes or a {"bytes": ...} struct, as img2dataset and Hugging Face write them."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, type(None))) else None


PARQUET_SUFFIXES = (".parquet",)


def parquet_records(input: str | Path) -> Iterator[Record]:
    """Records from img2dataset parquet files with an image column (jpg/image) and a caption column (caption/txt)."""
    import pyarrow.parquet as pq  # imported here: only parquet sources pay for it
    files = input_paths(input, PARQUET_SUFFIXES, "parquet file")
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


@dataclass(frozen=True)
class Format:
    """A source format: its adapter, the convert options it takes, and (for archives) the file endings it reads."""

    read: Callable[..., Iterator[Record]]
    options: tuple[str, ...] = ()  # convert's option names (dest) passed to `read` as keyword arguments
    suffixes: tuple[str, ...] | None = None  # set when INPUT names archive files (a file, folder or pattern)


FORMATS: dict[str, Format] = {
    "folder": Format(folder_records),
    "coco": Format(coco_records, ("annotations", "all_captions")),
    "webdataset": Format(webdataset_records, suffixes=WEBDATASET_SUFFIXES),
    "parquet": Format(parquet_records, suffixes=PARQUET_SUFFIXES),
    "sa1b": Format(publishers.sa1b_records, ("captions",), publishers.SA1B_SUFFIXES),
    "journeydb": Format(publishers.journeydb_records, ("annotations", "caption_field"), publishers.JOURNEYDB_SUFFIXES),
    "diffusiondb": Format(publishers.diffusiondb_records, ("annotations", "nsfw_threshold"),
                          publishers.DIFFUSIONDB_SUFFIXES),
}
