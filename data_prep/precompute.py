"""Precompute VAE latents and caption embeddings: MDS image shards -> MDS latent shards, resumably, one rank per GPU.

    python -m data_prep.precompute data/coco_mds --out data/coco_latents --resolution 256 512 \\
        --vae madebyollin/sdxl-vae-fp16-fix --text-encoder open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378 \\
        --device cuda --dtype bfloat16          # under `composer -n 8` or torchrun: one process per GPU

Samples are cut in input order into --chunk-size chunks; chunk k goes to rank k % world_size and is written as its own
MDS sub-directory with a done marker (data_prep/chunks.py), so ranks never share a file and a re-run skips committed
chunks. When every rank is done, rank 0 (or, with --workers, the parent) merges the chunk indexes into one index.json.
The step is `precompute(...)`; `main` only parses the command line. The VAE and text encoder default to hub models,
downloaded on first use (several GB); a local folder or `minilm` avoids that. Exit codes: 0 done, 1 a worker
failed or the output folder holds output of other options, 2 bad usage, 4 an input image that does not decode.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from streaming import MDSWriter
from streaming.base.local import LocalDataset
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_prep import chunks
from micro_diffusion.data.integrity import SHARD_HASHES
from micro_diffusion.data.schema import (
    CAPTION,
    CAPTION_EMB,
    ENCODERS_FILE,
    NULL_CAPTION_FILE,
    SAMPLE_ID,
    ArraySpec,
    latent_column,
)
from micro_diffusion.encoders import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, load_text_encoder, load_vae
from micro_diffusion.errors import DataError, MicroDiffusionError, UsageError, exit_with
from micro_diffusion.utils.argparsing import parser, renamed
from micro_diffusion.utils.atomic import write_text_atomic
from micro_diffusion.utils.folder_lock import hold

PROG = "data_prep.precompute"

OPTIONS_FILE = "precompute_options.json"
SUMMARY_FILE = "precompute_summary.json"
# Options that change what is written: a resumed run must use the same values.
_RESUME_KEYS = ("input", "resolution", "vae", "text_encoder", "caption_len", "dtype", "chunk_size", "shard_size")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Job:
    """The options of one precompute run (picklable: --workers hands it to spawned processes)."""

    input: Path
    output: Path
    resolution: tuple[int, ...]
    vae: str
    text_encoder: str
    caption_len: int
    batch_size: int
    device: str
    dtype: str
    workers: int
    decode_workers: int
    chunk_size: int
    shard_size: int
    verify_hashes: bool
    progress: bool


def crop_resize(image: Image.Image, res: int) -> torch.Tensor:
    """Centre square crop resized to res x res -> (3, res, res) float32 in [-1, 1]."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    # reducing_gap lets Pillow shrink large images by whole factors first: much faster, no visible difference.
    out = image.resize((res, res), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    arr = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy())  # (res, res, 3)
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, res, res)


class ImageSamples(Dataset):
    """Samples [start, stop) of an image-shard dataset, decoded and cropped to every resolution.

    `upscaled_{res}` is True where the image's short side is below res (the crop is enlarged to fit).
    """

    def __init__(self, source: LocalDataset, start: int, stop: int, resolutions: list[int]) -> None:
        self.source, self.start, self.stop, self.resolutions = source, start, stop, resolutions

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.source[self.start + i]
        try:
            image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        except OSError as err:
            raise DataError(f"sample {self.start + i} (id {sample.get('id')!r}): unreadable image: {err}") from err
        out = {f"image_{r}": crop_resize(image, r) for r in self.resolutions}
        out.update({f"upscaled_{r}": min(image.size) < r for r in self.resolutions})
        out.update({CAPTION: sample[CAPTION], SAMPLE_ID: sample[SAMPLE_ID]})
        return out


def open_input(path: Path) -> LocalDataset:
    """The image shards at `path`, checked for the columns precompute reads."""
    if not (path / "index.json").is_file():
        raise UsageError(f"INPUT: no MDS index at {path / 'index.json'} (run data_prep.convert first)")
    source = LocalDataset(str(path))
    for shard in source.shards:
        missing = {"image", CAPTION, SAMPLE_ID} - set(shard.column_names)
        if missing:
            raise UsageError(f"{path}: shard {shard.raw_data.basename} lacks columns {sorted(missing)}")
        if shard.compression:
            raise UsageError(f"{path}: shard {shard.raw_data.basename} is compressed ({shard.compression}); "
                             "precompute reads uncompressed image shards")
    return source


def columns_for(vae, text, resolutions: list[int]) -> dict[str, str]:
    """MDS columns of the latent shards, with shapes taken from the loaded encoders."""
    cols = {}
    for r in resolutions:
        if r % vae.downsample:
            raise UsageError(f"--resolution {r} is not a multiple of the VAE's downsampling factor {vae.downsample}")
        spec = ArraySpec(np.dtype("float16"), (vae.latent_channels, r // vae.downsample, r // vae.downsample))
        cols[latent_column(r)] = spec.encoding()
    cols[CAPTION_EMB] = ArraySpec(np.dtype("float16"), (text.caption_len, text.dim)).encoding()
    cols.update({CAPTION: "str", SAMPLE_ID: "str"})
    return cols


def encoders_info(args: Job, vae, text) -> dict[str, Any]:
    """The encoders.json content (docs/interfaces.md)."""
    return {"vae": args.vae, "scaling_factor": vae.scaling_factor, "latent_channels": vae.latent_channels,
            "downsample": vae.downsample, "text_encoder": text.name, "caption_len": text.caption_len,
            "caption_dim": text.dim, "resolutions": list(args.resolution)}


def check_options(args: Job) -> None:
    """Record the options that shape the output; refuse to resume a run made with different ones."""
    opts = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(args).items() if k in _RESUME_KEYS}
    chunks.check_resume_options(args.output, OPTIONS_FILE, opts)


def write_chunk(args: Job, k: int, source: LocalDataset, vae, text, columns: dict[str, str], bar: tqdm) -> None:
    """Encode samples of chunk k and commit it with a done marker."""
    start, stop = k * args.chunk_size, min((k + 1) * args.chunk_size, len(source))
    part = chunks.start_chunk(args.output, k)
    loader = DataLoader(ImageSamples(source, start, stop, args.resolution), batch_size=args.batch_size,
                        num_workers=args.decode_workers)
    upscaled = dict.fromkeys(map(str, args.resolution), 0)
    with MDSWriter(out=str(part), columns=columns, size_limit=args.shard_size, hashes=SHARD_HASHES) as writer:
        for batch in loader:
            for r in args.resolution:
                upscaled[str(r)] += int(batch[f"upscaled_{r}"].sum())
            lat = {r: vae.encode(batch[f"image_{r}"]).half().cpu().numpy() for r in args.resolution}  # (n,C,h,w)
            emb = text.encode(batch[CAPTION]).half().cpu().numpy()  # (n, L, D)
            for i, (caption, sid) in enumerate(zip(batch[CAPTION], batch[SAMPLE_ID], strict=True)):
                sample = {latent_column(r): lat[r][i] for r in args.resolution}
                sample.update({CAPTION_EMB: emb[i], CAPTION: caption, SAMPLE_ID: sid})
                writer.write(sample)
            bar.update(len(batch[CAPTION]))
    chunks.mark_done(args.output, k, {"start": start, "stop": stop, "chunk_size": args.chunk_size,
                                      "upscaled": upscaled})


def run_rank(args: Job, rank: int, world: int) -> tuple[Any, Any]:
    """Encode this rank's chunks (k % world == rank); return the loaded (vae, text encoder)."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    dtype = DTYPES[args.dtype]
    vae = load_vae(args.vae, device=device, dtype=dtype, batch_size=args.batch_size)
    text = load_text_encoder(args.text_encoder, device=device, dtype=dtype, caption_len=args.caption_len,
                             batch_size=args.batch_size)
    source = open_input(args.input)
    columns = columns_for(vae, text, args.resolution)
    mine = [k for k in range(math.ceil(len(source) / args.chunk_size)) if k % world == rank]
    todo = [k for k in mine if not chunks.is_done(args.output, k)]
    for k in sorted(set(mine) - set(todo)):
        payload = chunks.read_done(args.output, k)
        if payload.get("chunk_size") != args.chunk_size:
            raise chunks.ResumeOptionsError(f"{chunks.done_path(args.output, k)} was written with chunk size "
                             f"{payload.get('chunk_size')}, not {args.chunk_size}")
    total = sum(min((k + 1) * args.chunk_size, len(source)) - k * args.chunk_size for k in todo)
    with tqdm(total=total, unit="img", desc=f"precompute rank {rank}/{world}", position=rank,
              disable=not args.progress) as bar:
        for k in todo:
            write_chunk(args, k, source, vae, text, columns, bar)
    return vae, text


def summary(args: Job) -> dict[str, Any]:
    """Samples written and, per resolution, how many images had a short side below it (upscaled), from the markers."""
    out: dict[str, Any] = {"samples": 0, "chunks": 0, "upscaled": dict.fromkeys(map(str, args.resolution), 0)}
    for k in chunks.done_chunks(args.output):
        done = chunks.read_done(args.output, k)
        out["samples"] += done["stop"] - done["start"]
        out["chunks"] += 1
        for r, n in done.get("upscaled", {}).items():
            out["upscaled"][r] += n
    return out


def finish(args: Job, vae, text) -> dict[str, Any]:
    """Merge chunk indexes; write null_caption.npy, encoders.json and precompute_summary.json beside the shards."""
    chunks.merge_chunks(args.output)
    counts = summary(args)
    write_text_atomic(args.output / SUMMARY_FILE, json.dumps(counts, indent=1))
    print(f"precompute: {counts['samples']} samples -> {args.output}; upscaled (short side below the resolution): "
          + ", ".join(f"{n} at {r} px" for r, n in counts["upscaled"].items()), flush=True)
    null = text.encode([""])[0].half().cpu().numpy()  # (L, D)
    tmp = args.output / (NULL_CAPTION_FILE + ".tmp.npy")
    np.save(tmp, null)
    os.replace(tmp, args.output / NULL_CAPTION_FILE)
    write_text_atomic(args.output / ENCODERS_FILE, json.dumps(encoders_info(args, vae, text), indent=1))
    return counts


def _spawned_rank(args: Job, rank: int, world: int) -> None:
    """Entry of a --workers CPU process: share the cores, encode its chunks."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    run_rank(args, rank, world)


def precompute(input: str | Path, out: str | Path, resolutions: Sequence[int], *, vae: str, text_encoder: str,
               caption_len: int, batch_size: int = 32, device: str = "cpu", dtype: str = "float32", workers: int = 1,
               decode_workers: int = 0, chunk_size: int = 2048, shard_size: int = 1 << 26,
               verify_hashes: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Encode the image shards at `input` into latent shards at `out`, in this process, torchrun ranks or `workers`
    spawned CPU processes; return the summary (samples, chunks, upscaled per resolution) on the rank that merged, else
    None. `vae` and `text_encoder` name hub models or local folders (see micro_diffusion.encoders)."""
    if not Path(input).is_dir():  # before any encoder loads or output folder is made
        raise UsageError(f"INPUT {input} is not a folder: give the MDS image shards data_prep.convert wrote")
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file: give the folder for the latent shards")
    if dtype not in DTYPES or device not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} / dtype {dtype!r}: expected cpu|cuda and one of {', '.join(DTYPES)}")
    if not resolutions:
        raise UsageError("--resolution: give at least one image size")
    args = Job(Path(input), Path(out), tuple(int(r) for r in resolutions), vae, text_encoder, caption_len, batch_size,
               device, dtype, workers, decode_workers, chunk_size, shard_size, verify_hashes, progress)
    with hold(args.output, "precompute", beside=True):  # one writer per output (torchrun's rank 0 holds it)
        return _run(args)


def _run(args: Job) -> dict[str, Any] | None:
    """Precompute in this process, in torchrun ranks, or in --workers spawned CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if args.workers < 1 or args.batch_size < 1 or args.chunk_size < 1:
        raise UsageError("--workers, --batch-size and --chunk-size must be at least 1")
    if args.workers > 1 and (world > 1 or args.device == "cuda"):
        raise UsageError("--workers spawns CPU processes; on GPUs launch one process per GPU (composer -n / torchrun)")
    if rank == 0:
        check_options(args)
        chunks.remove_unfinished(args.output)
        for line in chunks.drop_damaged(args.output, hashes=args.verify_hashes):
            print(f"precompute: {line}", flush=True)
    if args.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_spawned_rank, args=(args, r, args.workers)) for r in range(args.workers)]
        for p in procs:
            p.start()
        for r, p in enumerate(procs):
            p.join()
            if p.exitcode != 0:
                raise MicroDiffusionError(f"precompute worker {r} failed with exit code {p.exitcode}")
        vae = load_vae(args.vae, dtype=DTYPES[args.dtype])
        text = load_text_encoder(args.text_encoder, dtype=DTYPES[args.dtype], caption_len=args.caption_len)
        return finish(args, vae, text)
    if world > 1 and not torch.distributed.is_initialized():
        # A day's timeout: ranks wait at the barrier for the slowest one to finish its chunks.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    if world > 1:
        torch.distributed.barrier()  # rank 0 has checked the options and cleared unfinished chunks
    vae, text = run_rank(args, rank, world)
    if world > 1:
        torch.distributed.barrier()  # every chunk is committed before the merge
    return finish(args, vae, text) if rank == 0 else None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m data_prep.precompute`."""
    p = parser(f"python -m {PROG}", __doc__.split("\n\n")[0])
    p.add_argument("input", metavar="INPUT", type=Path, help="MDS image shards (data_prep.convert output)")
    p.add_argument("--out", required=True, type=Path, help="output folder of MDS latent shards")
    renamed(p, "--input", "the positional INPUT (give INPUT as the first argument)")
    renamed(p, "--output", "--out")
    p.add_argument("--resolution", required=True, type=int, nargs="+", help="image sizes to encode, e.g. 256 512")
    p.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL: a hub id (downloaded on first use) or a local "
                   "folder")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, help="open_clip:<model>[:<pretrained>] (hub "
                   "weights, downloaded on first use), minilm, or a local transformers folder")
    p.add_argument("--caption-len", type=int, default=77, help="caption tokens kept (padded or truncated)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: this rank's GPU (LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="encoder weight/compute dtype")
    p.add_argument("--workers", type=int, default=1, help="CPU processes spawned here (not with torchrun ranks)")
    p.add_argument("--decode-workers", type=int, default=0, help="image-decoding processes per rank")
    p.add_argument("--chunk-size", type=int, default=2048, help="samples per resumable chunk (part-NNNNN/)")
    p.add_argument("--shard-size", type=int, default=1 << 26, help="MDS shard size limit in bytes")
    p.add_argument("--verify-hashes", action="store_true",
                   help="on a re-run, check the hash of every committed chunk (not only its size) and rewrite those "
                        "that fail")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse argv and run `precompute`; exit 0, or the project's exit code for a failed step."""
    args = vars(build_parser().parse_args(argv))
    args["resolutions"] = args.pop("resolution")
    args["progress"] = not args.pop("no_progress")

    def run() -> int:
        precompute(**args)
        return 0

    return exit_with(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
