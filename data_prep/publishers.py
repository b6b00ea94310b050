"""Adapters for sources read in the layouts their publishers ship, archives read in place (nothing unpacked to disk).

    SA-1B        sa_NNNNNN.tar holding sa_K.jpg + sa_K.json (masks, unused); captions from the LLaVA captions release
                 (SA1B_caption.tar.gz of PixArt-alpha/SAM-LLaVA-Captions10M, or its unpacked folder): sa_K.txt, paired
                 by file stem.
    JourneyDB    data/train/imgs/NNN.tgz holding NNN/<name>.jpg; data/train/train_anno_realease_repath.jsonl(.tgz), one
                 JSON line per image with img_path (./NNN/<name>.jpg), prompt and, in some releases, Task2.Caption.
    DiffusionDB  2M: images/part-NNNNNN.zip (PNG); Large: diffusiondb-large-part-{1,2}/part-NNNNNN.zip (WebP). Each zip
                 holds its images and part-NNNNNN.json ({image name: {"p": prompt, "se", "c", "st", "sa"}});
                 metadata(-large).parquet has a row per image: image_name, part_id, prompt, image_nsfw, prompt_nsfw.

data_prep/README.md says where each layout was confirmed. Every image found is one input (written or rejected with
its reason); annotation lines are not inputs, except a JourneyDB line whose archive was given but lacks its image.
"""
from __future__ import annotations

import json
import re
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.images import IMAGE_EXTENSIONS
from data_prep.sources import ARCHIVE_ERRORS, Record, SourceError, input_paths, member_stem, tar_files

SA1B_SUFFIXES = (".tar",)
JOURNEYDB_SUFFIXES = (".tgz", ".tar.gz")
DIFFUSIONDB_SUFFIXES = (".zip",)
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


def _archive_stems(tars: Iterable[Path]) -> set[str]:
    """Stems of the images in uncompressed tars, from their headers only (tarfile seeks past the data)."""
    stems = set()
    for tar in tars:
        try:
            with tarfile.open(tar, "r:") as tf:
                for info in tf:
                    stem, ext = member_stem(info.name)
                    if info.isfile() and ext in _IMAGE_EXTS:
                        stems.add(stem)
        except ARCHIVE_ERRORS:
            pass  # the reading pass reports the damage as a corrupt_tar input; its stems so far are kept
    return stems


def _sa1b_captions(captions: Path, wanted: set[str]) -> dict[str, bytes | Path]:
    """stem -> caption (bytes from the tar.gz, or the .txt path in a folder) for the wanted image stems only."""
    if captions.is_dir():
        return {p.stem: p for p in captions.rglob("*.txt") if p.stem in wanted}
    if not captions.is_file():
        raise SourceError(f"--captions {captions}: no such file or folder")
    found: dict[str, bytes | Path] = {}
    for name, data, error in tar_files(captions):
        if error is not None:
            raise SourceError(f"--captions {captions}: not a readable tar of sa_K.txt files ({error})")
        stem, ext = member_stem(name)
        if ext == "txt" and stem in wanted:
            found.setdefault(stem, data)
    return found


def sa1b_records(input: str | Path, captions: Path | None = None) -> Iterator[Record]:
    """SA-1B tars (sa_K.jpg; the sa_K.json masks are not inputs), captioned by stem from the LLaVA captions."""
    tars = input_paths(input, SA1B_SUFFIXES, "tar")
    if captions is None:
        raise SourceError("format sa1b needs --captions: SA1B_caption.tar.gz or the folder of sa_K.txt it unpacks to")
    captions = Path(captions)
    # Only the captions of the images given are kept: the full release holds about 11M of them.
    index = _sa1b_captions(captions, _archive_stems(tars))

    def gen() -> Iterator[Record]:
        for tar in tars:
            for name, data, error in tar_files(tar):
                if error is not None:
                    yield Record(str(tar), None, None, None, reject=f"corrupt_tar: {error}")
                    continue
                stem, ext = member_stem(name)
                if ext not in _IMAGE_EXTS:
                    continue
                caption = index.get(stem)
                reject = None if caption is not None else f"missing_caption: no {stem}.txt in {captions}"
                yield Record(f"{tar}::{name}", stem, data, caption, reject)

    return gen()


def _jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(where, line) of a .jsonl file, or of the .jsonl inside a tar(.gz) of one."""
    if not tarfile.is_tarfile(path):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield f"{path}:{n}", line
        return
    try:
        with tarfile.open(path, "r|*") as tf:
            for info in tf:
                if info.isfile() and info.name.endswith(".jsonl"):
                    for n, raw in enumerate(tf.extractfile(info), 1):
                        yield f"{path}::{info.name}:{n}", raw.decode("utf-8", errors="replace")
                    return
    except ARCHIVE_ERRORS as e:
        raise SourceError(f"--annotations {path}: damaged archive ({type(e).__name__}: {e})") from e
    raise SourceError(f"--annotations {path}: the archive holds no .jsonl file")


def _jdb_key(path: str, folder: str | None = None) -> str:
    """An image's key inside the images root: `./000/ab.jpg` -> `000/ab.jpg`; a bare name goes under `folder`."""
    key = path.strip().removeprefix("./").lstrip("/")
    return f"{folder}/{key}" if folder is not None and "/" not in key else key


def _journeydb_annotations(path: Path, field: str, folders: set[str]) -> dict[str, dict[str, str | None]]:
    """folder -> {image key -> caption or None} for the images in the given archives (first line of a key wins)."""
    if not path.is_file():
        raise SourceError(f"--annotations {path}: no such file")
    table: dict[str, dict[str, str | None]] = {}
    for where, line in _jsonl_lines(path):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = _jdb_key(entry["img_path"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"{where}: expected a JSON object with img_path, got {line.strip()[:80]!r} "
                              f"({type(e).__name__}: {e})") from e
        folder = key.split("/", 1)[0]
        if folder not in folders:
            continue
        caption = entry.get("prompt") if field == "prompt" else (entry.get("Task2") or {}).get("Caption")
        table.setdefault(folder, {}).setdefault(key, caption if isinstance(caption, str) else None)
    return table


def _archive_stem(path: Path) -> str:
    """`imgs/000.tgz` -> `000`."""
    return path.name.removesuffix(".tgz").removesuffix(".tar.gz")


def journeydb_records(input: str | Path, annotations: Path | None = None, caption_field: str = "prompt"
                      ) -> Iterator[Record]:
    """JourneyDB image archives (NNN.tgz), captioned from the annotation jsonl by img_path (prompt or Task2 caption)."""
    archives = input_paths(input, JOURNEYDB_SUFFIXES, "tgz")
    if annotations is None:
        raise SourceError("format journeydb needs --annotations: train_anno_realease_repath.jsonl or its .jsonl.tgz")
    if caption_field not in ("prompt", "caption"):
        raise SourceError(f"--caption-field {caption_field!r}: journeydb reads 'prompt' or 'caption'")
    annotations = Path(annotations)
    field = "prompt" if caption_field == "prompt" else "Task2.Caption"
    table = _journeydb_annotations(annotations, caption_field, {_archive_stem(a) for a in archives})

    def gen() -> Iterator[Record]:
        for archive in archives:
            folder = _archive_stem(archive)
            listed = table.get(folder, {})
            seen = set()
            for name, data, error in tar_files(archive):
                key = _jdb_key(name, folder) if name else ""
                seen.add(key)
                if error is not None:
                    yield Record(str(archive), None, None, None, reject=f"corrupt_tar: {error}")
                    continue
                reject = None
                if member_stem(name)[1] not in _IMAGE_EXTS:
                    reject = "not_an_image: not an image file name"
                elif key not in listed:
                    reject = f"missing_caption: {key} is not in {annotations.name}"
                elif listed[key] is None:
                    reject = f"missing_caption: no {field} for {key} in {annotations.name}"
                yield Record(f"{archive}::{name}", key.rpartition(".")[0] or key, data, listed.get(key), reject)
            for key in sorted(set(listed) - seen):
                yield Record(f"{annotations}#img_path={key}", key.rpartition(".")[0] or key, None, listed[key],
                             reject=f"missing_image: listed in {annotations.name}, not in {archive.name}")

    return gen()


_PART_RE = re.compile(r"part-(\d+)\.zip$")
_META_COLUMNS = ("image_name", "part_id", "prompt", "image_nsfw", "prompt_nsfw")
_PARTS_PER_READ = 500  # parquet rows are read for this many zips at a time: Large's table has 14M rows


def _part_id(path: Path) -> int:
    m = _PART_RE.search(path.name)
    if m is None:
        raise SourceError(f"{path}: not named part-NNNNNN.zip, so its rows in the metadata parquet cannot be found")
    return int(m.group(1))


def _check_metadata(path: Path) -> None:
    """Fail before writing anything if the parquet lacks a column the adapter reads."""
    import pyarrow.parquet as pq  # imported here: only parquet-backed runs pay for it

    if not path.is_file():
        raise SourceError(f"--annotations {path}: no such file")
    try:
        names = set(pq.ParquetFile(path).schema_arrow.names)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet; all mean the same
        raise SourceError(f"--annotations {path}: not a parquet file ({type(e).__name__}: {e})") from e
    missing = [c for c in _META_COLUMNS if c not in names]
    if missing:
        raise SourceError(f"--annotations {path}: no column(s) {missing} (DiffusionDB's metadata has {_META_COLUMNS})")


def _read_metadata(path: Path, part_ids: list[int]) -> dict[tuple[int, str], tuple]:
    """(part_id, image_name) -> (prompt, image_nsfw, prompt_nsfw) for the rows of the given parts."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(_META_COLUMNS), filters=[("part_id", "in", part_ids)])
    cols = [table.column(c).to_pylist() for c in _META_COLUMNS]
    return {(int(part), name): (prompt, s_img, s_prompt) for name, part, prompt, s_img, s_prompt
            in zip(*cols, strict=True)}


def _nsfw_reject(row: tuple, threshold: float | None) -> str | None:
    """The reference release's filter: drop a row when either score exceeds the threshold (image score first).

    A missing score compares as not exceeding, as it does in the reference release.
    """
    _, s_img, s_prompt = row
    if threshold is None:
        return None
    if s_img is not None and s_img > threshold:
        return f"nsfw_image: image_nsfw {s_img:.3g} > {threshold}"
    if s_prompt is not None and s_prompt > threshold:
        return f"nsfw_prompt: prompt_nsfw {s_prompt:.3g} > {threshold}"
    return None


def _part_prompts(zf: zipfile.ZipFile, names: list[str]) -> tuple[dict, str | None]:
    """The part's own json (image name -> {"p": prompt, ...}), or ({}, why it is unusable)."""
    jsons = [n for n in names if n.endswith(".json")]
    if not jsons:
        return {}, "the zip holds no part-NNNNNN.json"
    try:
        data = json.loads(zf.read(jsons[0]))
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        return data, None
    except (ValueError, TypeError, zipfile.BadZipFile, *ARCHIVE_ERRORS) as e:
        return {}, f"{jsons[0]} unreadable ({type(e).__name__}: {e})"


def _zip_records(path: Path, meta: dict | None, threshold: float | None) -> Iterator[Record]:
    """The images of one DiffusionDB part zip (sorted by name), captioned from the metadata rows or the part json."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        yield Record(str(path), None, None, None, reject=f"corrupt_zip: {type(e).__name__}: {e}")
        return
    with zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        prompts, why = _part_prompts(zf, names) if meta is None else ({}, None)
        part = _part_id(path) if meta is not None else None
        for name in names:
            stem, ext = member_stem(name)
            if ext == "json":
                continue
            base = name.rsplit("/", 1)[-1]
            try:
                data = zf.read(name)
            except (zipfile.BadZipFile, *ARCHIVE_ERRORS) as e:
                yield Record(f"{path}::{name}", stem, None, None, reject=f"corrupt_zip: {type(e).__name__}: {e}")
                continue
            if meta is not None:
                row = meta.get((part, base))
                caption = row[0] if row else None
                reject = _nsfw_reject(row, threshold) if row else "missing_caption: not in the metadata parquet"
            else:
                entry = prompts.get(base)
                caption = entry.get("p") if isinstance(entry, dict) else None
                reject = None if caption is not None else f"missing_caption: {why or 'not in the part json'}"
            yield Record(f"{path}::{name}", stem, data, caption, reject)


def diffusiondb_records(input: str | Path, annotations: Path | None = None, nsfw_threshold: float | None = 0.2
                        ) -> Iterator[Record]:
    """DiffusionDB part zips (2M or Large), prompts from the parts' json or, given, the metadata parquet."""
    zips = input_paths(input, DIFFUSIONDB_SUFFIXES, "zip")
    if annotations is None and nsfw_threshold is not None:
        raise SourceError("format diffusiondb: the NSFW filter (--nsfw-threshold, default 0.2) needs the scores in "
                          "metadata.parquet or metadata-large.parquet: pass it as --annotations, or give "
                          "--nsfw-threshold off to read the parts' own json without the filter")
    if annotations is not None:
        annotations = Path(annotations)
        _check_metadata(annotations)
        ids = {z: _part_id(z) for z in zips}

    def gen() -> Iterator[Record]:
        for start in range(0, len(zips), _PARTS_PER_READ):
            group = zips[start:start + _PARTS_PER_READ]
            meta = _read_metadata(annotations, sorted({ids[z] for z in group})) if annotations is not None else None
            for path in group:
                yield from _zip_records(path, meta, nsfw_threshold)

    return gen()
