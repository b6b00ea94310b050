"""Convert image-caption sources (folder, COCO, webdataset tars, parquet) into MDS image shards, resumably.

    python -m data_prep.convert photos/ --format folder --out data/photos_mds

Every input is either normalised and written (fixes counted by reason) or listed once in OUT/rejected.jsonl.
Resumption: see data_prep/chunks.py. Inputs are cut in input order into --chunk-size chunks, each written to its own
MDS sub-directory and committed by an atomic done marker that also holds its rejected lines and counts, so a re-run
of the same command (also after kill -9) skips committed chunks, redoes the unfinished one and loses or repeats
nothing. Duplicate ids are decided in input order before any chunk is skipped, so they come out the same on a re-run.
The step is `convert(...)`; `main` only parses the command line. Exit codes: 0 done, 1 the input, output folder or
resume options are wrong (nothing written), 2 bad usage.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep import chunks
from data_prep.adapters import FORMATS, Record, SourceError
from data_prep.images import Settings, normalise_item
from data_prep.sources import input_paths, is_pattern
from micro_diffusion.data.integrity import SHARD_HASHES
from micro_diffusion.errors import MicroDiffusionError, UsageError, check_counts, exit_with
from micro_diffusion.utils.argparsing import parser, renamed
from micro_diffusion.utils.atomic import write_text_atomic
from micro_diffusion.utils.folder_lock import holding

__all__ = ["ConvertError", "ConvertResult", "SourceError", "check_options", "convert", "main"]

PROG = "data_prep.convert"
COLUMNS = {"image": "bytes", "caption": "str", "width": "int", "height": "int", "id": "str"}
OPTIONS_FILE = "convert_options.json"
MIN_SIZE = 64  # px, short side: below it a photograph carries too little detail even for 256-px training
MAX_SIDE, MAX_CAPTION_CHARS, CHUNK_SIZE, SHARD_SIZE = 512, 1000, 5000, 1 << 26
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
# Options that change what is written: a resumed run must use the same values.
_RESUME_KEYS = ("format", "input", "annotations", "all_captions", "captions", "caption_field", "nsfw_threshold",
                "max_side", "min_size", "max_pixels", "center_crop_resize", "max_caption_chars", "chunk_size",
                "shard_size")
# Per-format options (FORMATS[...].options) and the value each takes when its format is chosen and it is not given.
_FORMAT_OPTION_DEFAULTS = {"annotations": None, "all_captions": False, "captions": None, "caption_field": "prompt",
                           "nsfw_threshold": 0.2}
NSFW_OFF = "off"


class ConvertError(MicroDiffusionError):
    """A problem with the command itself (input pattern, output folder): stop before touching anything (exit 1)."""


@dataclass(frozen=True)
class ConvertResult:
    """What a convert run wrote (also in OUT/convert_summary.json, without `out`)."""

    out: Path
    inputs: int
    written: int
    rejected: int
    chunks: int
    written_by_fix: dict[str, int]
    rejected_by_reason: dict[str, int]

    def summary(self) -> dict[str, Any]:
        """The convert_summary.json content."""
        return {k: v for k, v in asdict(self).items() if k != "out"}


def _threshold(text: str) -> float | str:
    """--nsfw-threshold: a score in [0, 2] (DiffusionDB's scores run to 2.0, "already blurred") or 'off'."""
    if text == NSFW_OFF:
        return NSFW_OFF
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 2] or 'off', got {text}")
    return value


def check_options(format: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check convert's options (names as convert's keywords); return them with the format's defaults filled in.

    Raises UsageError naming the flag: a format that does not exist, a size below its minimum, or an option the
    format does not take (given as anything but None/False)."""
    if format not in FORMATS:
        raise UsageError(f"--format {format}: not one of {', '.join(sorted(FORMATS))}")
    check_counts(**{name: options[name] for name in ("max_side", "chunk_size", "shard_size", "max_caption_chars",
                                                     "max_pixels", "center_crop_resize")})
    if options["min_size"] < 0 or options["workers"] < 0:
        raise UsageError("--min-size and --workers must not be negative")
    threshold = options.get("nsfw_threshold")
    if threshold not in (None, NSFW_OFF) and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 2.0):
        raise UsageError(f"--nsfw-threshold must be in [0, 2] or 'off', got {threshold!r}")
    takes = FORMATS[format].options
    wrong = [k for k in _FORMAT_OPTION_DEFAULTS if k not in takes and options.get(k) not in (None, False)]
    if wrong:
        users = {k: sorted(f for f, spec in FORMATS.items() if k in spec.options) for k in wrong}
        raise UsageError(f"--format {format} takes no " + ", ".join(
            f"--{k.replace('_', '-')} (for {'/'.join(users[k])})" for k in wrong))
    filled = dict(options)
    for k, default in _FORMAT_OPTION_DEFAULTS.items():
        if k in takes and filled.get(k) is None:
            filled[k] = default
    return filled


def open_records(format: str, input: str, opts: dict[str, Any]) -> Iterator[Record]:
    """The adapter's record iterator for the chosen format (raises SourceError for a wrong input)."""
    options = {k: opts[k] for k in FORMATS[format].options}
    if options.get("nsfw_threshold") == NSFW_OFF:
        options["nsfw_threshold"] = None
    return FORMATS[format].read(input, **options)


def _input_identity(format: str, input: str) -> dict[str, Any]:
    """What INPUT names, for the resume check: its absolute path (or the pattern as given) and, for archive
    formats, the files it names now: a glob or a folder can hold more files on a later run (a download still going on),
    and resuming then would shift every chunk; the file list's hash catches that."""
    pattern = is_pattern(input)
    suffixes = FORMATS[format].suffixes
    if pattern and suffixes is None:
        raise ConvertError(f"INPUT {input}: --format {format} takes one folder, not a pattern")
    identity = {"input": input if pattern else str(Path(input).resolve()), "input_files": None}
    if suffixes is not None:
        files = [str(f.resolve()) for f in input_paths(input, suffixes, "file")]
        digest = hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]
        identity["input_files"] = f"{len(files)} files, sha1 {digest}"
    return identity


def prepare_output(out: Path, opts: dict[str, Any], verify_hashes: bool, log: Callable[[str], None]) -> None:
    """Create/check the output folder and the options a resumed run must repeat; clear unfinished chunks."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConvertError(f"--out {out}: cannot write there ({type(e).__name__}: {e})") from e
    options = {k: opts[k] for k in _RESUME_KEYS}
    options.update(_input_identity(opts["format"], opts["input"]))
    for k in ("annotations", "captions"):
        options[k] = str(Path(options[k]).resolve()) if options[k] is not None else None
    chunks.check_resume_options(out, OPTIONS_FILE, options)
    chunks.remove_unfinished(out)
    for line in chunks.drop_damaged(out, hashes=verify_hashes):
        log(f"convert: {line}")


def _reject_line(rec: Record, reason: str, detail: str = "") -> dict[str, Any]:
    """The rejected.jsonl entry of one dropped input."""
    line = {"source": rec.source, "id": rec.id, "reason": reason}
    if detail:
        line["detail"] = detail[:300]
    return line


def write_chunk(out: Path, index: int, batch: list[tuple[Record, str | None]], mapper, shard_size: int) -> None:
    """Normalise and write one chunk (records with a pre-decided rejection or None) and commit it with its marker."""
    from streaming import MDSWriter

    todo = [(rec.id, rec.image, rec.caption) for rec, pre in batch if pre is None]
    results = iter(mapper(todo))
    rejected, notes, written = [], Counter(), 0
    part = chunks.start_chunk(out, index)
    with MDSWriter(out=str(part), columns=COLUMNS, size_limit=shard_size, hashes=SHARD_HASHES) as writer:
        for rec, pre in batch:
            if pre is not None:
                rejected.append(_reject_line(rec, *pre.split(": ", 1)))
                continue
            res = next(results)
            if "reason" in res:
                rejected.append(_reject_line(rec, res["reason"], res["detail"]))
                continue
            writer.write({"image": res["image"], "caption": res["caption"], "width": res["width"],
                          "height": res["height"], "id": rec.id})
            notes.update(res["notes"] or ["unchanged"])
            written += 1
    chunks.mark_done(out, index, {"inputs": len(batch), "written": written, "notes": dict(notes),
                                  "rejected": rejected})


def _precheck(batch: list[Record], seen: set[str]) -> list[tuple[Record, str | None]]:
    """Rejections known before decoding: adapter-level ones and duplicate ids (the first in input order wins)."""
    out = []
    for rec in batch:
        if rec.reject is not None:
            out.append((rec, rec.reject))
        elif rec.id in seen:
            out.append((rec, "duplicate_id"))
        else:
            seen.add(rec.id)
            out.append((rec, None))
    return out


def finish(out: Path) -> ConvertResult:
    """Merge chunk indexes, write rejected.jsonl and convert_summary.json from the committed markers."""
    chunks.merge_chunks(out)
    summary: dict[str, Any] = {"inputs": 0, "written": 0, "rejected": 0, "chunks": 0}
    notes, reasons, lines = Counter(), Counter(), []
    for k in chunks.done_chunks(out):
        done = chunks.read_done(out, k)
        summary["inputs"] += done["inputs"]
        summary["written"] += done["written"]
        summary["chunks"] += 1
        notes.update(done["notes"])
        for line in done["rejected"]:
            reasons[line["reason"]] += 1
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    summary["rejected"] = len(lines)
    summary["written_by_fix"] = dict(sorted(notes.items()))
    summary["rejected_by_reason"] = dict(sorted(reasons.items()))
    write_text_atomic(out / "rejected.jsonl", "".join(lines))
    write_text_atomic(out / "convert_summary.json", json.dumps(summary, indent=1))
    return ConvertResult(out=out, **summary)


@holding("convert", beside=True)  # one writer per output folder (its lock file beside it): a second one raises Busy
def convert(input: str | Path, out: str | Path, format: str, *, annotations: str | Path | None = None,
            all_captions: bool = False, captions: str | Path | None = None, caption_field: str | None = None,
            nsfw_threshold: float | str | None = None, max_side: int = MAX_SIDE, min_size: int = MIN_SIZE,
            max_pixels: int = Settings.max_pixels, center_crop_resize: int | None = None,
            max_caption_chars: int = MAX_CAPTION_CHARS, workers: int = DEFAULT_WORKERS, chunk_size: int = CHUNK_SIZE,
            shard_size: int = SHARD_SIZE, verify_hashes: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> ConvertResult:
    """Convert INPUT (a folder, file or pattern, per `format`) into MDS image shards under `out`, resumably.

    Per-format options (annotations, all_captions, captions, caption_field, nsfw_threshold: a score or "off") are
    refused for formats that do not take them. Raises UsageError for bad options, SourceError for an unreadable input,
    ConvertError for an unwritable `out` and ResumeOptionsError for an `out` written with other options."""
    paths = {"annotations": annotations, "captions": captions}
    opts = check_options(format, {
        "format": format, "input": str(input), "all_captions": all_captions, "caption_field": caption_field,
        "nsfw_threshold": nsfw_threshold, "max_side": max_side, "min_size": min_size, "max_pixels": max_pixels,
        "center_crop_resize": center_crop_resize, "max_caption_chars": max_caption_chars, "workers": workers,
        "chunk_size": chunk_size, "shard_size": shard_size,
        **{k: Path(v) if v is not None else None for k, v in paths.items()}})
    out = Path(out)
    if not is_pattern(str(input)) and not Path(input).exists():  # a missing input is a usage error, before any output
        raise UsageError(f"INPUT {input} does not exist: give the {format} source's file, folder or pattern")
    records = open_records(format, opts["input"], opts)
    prepare_output(out, opts, verify_hashes, log)
    settings = Settings(max_side=max_side, min_size=min_size, max_pixels=max_pixels, center_crop=center_crop_resize,
                        max_caption_chars=max_caption_chars)
    work = functools.partial(normalise_item, settings)
    pool = None
    if workers > 0:
        # forkserver: workers fork from a fresh server that imports only data_prep.images (Pillow, numpy). Forking
        # this process instead can deadlock once torch has started its thread pools (as in tests or the demo), and
        # spawning would re-import streaming and torch in every worker (seconds each).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["data_prep.images"])
        pool = ctx.Pool(workers)
    mapper = (lambda items: pool.imap(work, items, chunksize=4)) if pool else (lambda items: map(work, items))
    seen: set[str] = set()
    bar = tqdm(unit="img", desc="convert", disable=not progress, smoothing=0.1)
    try:
        for k, batch in chunks.enumerate_chunks(records, chunk_size):
            checked = _precheck(batch, seen)
            if not chunks.is_done(out, k):
                write_chunk(out, k, checked, mapper, shard_size)
            bar.update(len(batch))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return finish(out)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m data_prep.convert`."""
    p = parser(f"python -m {PROG}", __doc__.split("\n\n")[0])
    p.add_argument("input", metavar="INPUT",
                   help="folder, coco: the images folder; archive formats: a file, a folder of them, a brace pattern "
                        "('shards/{00000..00099}.tar') or a shell glob ('tars/sa_*.tar'); quote patterns")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="source format")
    p.add_argument("--out", required=True, type=Path, help="output folder of MDS shards")
    renamed(p, "--input", "the positional INPUT (give INPUT as the first argument)")
    renamed(p, "--output", "--out")
    p.add_argument("--annotations", type=Path,
                   help="coco: captions_*.json; journeydb: the annotation .jsonl or its .jsonl.tgz; diffusiondb: "
                        "metadata.parquet or metadata-large.parquet (prompts and NSFW scores)")
    p.add_argument("--all-captions", action="store_true", help="coco: one sample per caption (id imageid_annid)")
    p.add_argument("--captions", type=Path,
                   help="sa1b: SA1B_caption.tar.gz or the folder of sa_K.txt it unpacks to (paired by file stem)")
    p.add_argument("--caption-field", choices=("prompt", "caption"),
                   help="journeydb: the generation prompt (prompt when not given, as the paper's release used) or the "
                        "Task2 caption")
    p.add_argument("--nsfw-threshold", type=_threshold,
                   help="diffusiondb: drop rows whose image_nsfw or prompt_nsfw exceeds this (0.2 when not given, as "
                        "the reference release); 'off' keeps them (needed without --annotations)")
    p.add_argument("--max-side", type=int, default=MAX_SIDE, help="shrink so the short side is at most this (px)")
    p.add_argument("--min-size", type=int, default=MIN_SIZE,
                   help="reject images whose short side is below this (px; smaller photographs would be upscaled "
                        "several times over at precompute)")
    p.add_argument("--max-pixels", type=int, default=Settings.max_pixels,
                   help="reject images with more pixels than this (decompression bombs)")
    p.add_argument("--center-crop-resize", type=int, metavar="RES",
                   help="store a centre square crop resized to RES x RES instead of the aspect-kept image")
    p.add_argument("--max-caption-chars", type=int, default=MAX_CAPTION_CHARS, help="truncate longer captions "
                   "(counted)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="decode processes (0: in this process)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="inputs per resumable chunk (part-NNNNN/)")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="MDS shard size limit in bytes")
    p.add_argument("--verify-hashes", action="store_true",
                   help="on a re-run, check the hash of every committed chunk (not only its size) and rewrite those "
                        "that fail")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_result(result: ConvertResult) -> None:
    """The summary lines the command prints."""
    print(f"convert: {result.written} written, {result.rejected} rejected of {result.inputs} inputs -> {result.out}")
    for title, counts in (("fixes", result.written_by_fix), ("rejections", result.rejected_by_reason)):
        for reason, n in counts.items():
            print(f"  {title}: {reason}: {n}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse argv and run `convert`; exit 0, 1 (input/output/resume problem) or 2 (usage)."""
    p = build_parser()
    args = vars(p.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    try:  # bad option combinations are usage errors of the command line, reported as argparse does
        check_options(args["format"], args)
    except UsageError as err:
        p.error(str(err))
    return exit_with(PROG, lambda: _print_result(convert(**args)))


if __name__ == "__main__":
    sys.exit(main())
