"""Data benchmarks: precompute images/s (tiny VAE + MiniLM on CPU) and loader samples/s per worker process.

    .venv/bin/python benchmarks/bench_data.py [--samples 2000] [--images 128]

Writes OUT/data.json (`--out`, default benchmarks/results). The target: at least 600 loader samples/s
per worker on 4x32x32 latents with 77x1024 fp16 caption embeddings.
"""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import MDSWriter
from tqdm import tqdm

from benchmarks.common import add_out_argument, write_result
from micro_diffusion.utils.argparsing import parser as make_parser


def write_latent_shards(out: Path, n: int) -> None:
    """n random samples of 4x32x32 fp16 latents and 77x1024 fp16 caption embeddings, plus a null caption."""
    rng = np.random.default_rng(0)
    cols = {"latents_256": "ndarray:float16:4,32,32", "caption_emb": "ndarray:float16:77,1024", "caption": "str",
            "id": "str"}
    with MDSWriter(out=str(out), columns=cols) as w:
        for i in tqdm(range(n), desc="writing latent shards", unit="sample"):
            w.write({"latents_256": rng.standard_normal((4, 32, 32)).astype(np.float16),
                     "caption_emb": rng.standard_normal((77, 1024)).astype(np.float16),
                     "caption": f"caption {i}", "id": str(i)})
    np.save(out / "null_caption.npy", np.zeros((77, 1024), np.float16))


def bench_loader(local: Path, num_workers: int, batch_size: int = 32) -> dict:
    """One epoch through build_dataloader; rate counted from the first batch (worker start-up excluded)."""
    from micro_diffusion.data.loader import build_dataloader

    loader = build_dataloader([{"local": str(local), "remote": None, "proportion": None}], batch_size, 256,
                              num_workers=num_workers, caption_drop_prob=0.1)
    it = iter(loader)
    start_up = time.perf_counter()
    next(it)
    t0 = time.perf_counter()
    n = sum(len(batch["id"]) for batch in it)
    secs = time.perf_counter() - t0
    del it, loader
    rate = n / secs
    return {"num_workers": num_workers, "batch_size": batch_size, "samples": n, "seconds": round(secs, 3),
            "first_batch_s": round(t0 - start_up, 3), "samples_per_s": round(rate, 1),
            "samples_per_s_per_worker": round(rate / max(num_workers, 1), 1)}


def write_image_shards(out: Path, n: int, size: int = 160) -> None:
    """n random-noise JPEGs (slightly non-square) in the image-shard columns of data_prep.convert."""
    rng = np.random.default_rng(0)
    cols = {"image": "bytes", "caption": "str", "width": "int", "height": "int", "id": "str"}
    with MDSWriter(out=str(out), columns=cols) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size + 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            w.write({"image": buf.getvalue(), "caption": f"a noisy picture number {i}", "width": size + 32,
                     "height": size, "id": f"img{i}"})


def bench_precompute(tmp: Path, n: int) -> dict:
    """data_prep.precompute at 128 px with a tiny 3-level VAE and MiniLM, in this process, on CPU."""
    from diffusers import AutoencoderKL

    from data_prep.precompute import precompute

    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1,
                  norm_num_groups=8).save_pretrained(tmp / "vae")
    write_image_shards(tmp / "images", n)
    t0 = time.perf_counter()
    precompute(tmp / "images", tmp / "latents", [128], vae=str(tmp / "vae"), text_encoder="minilm", caption_len=77,
               batch_size=32)
    secs = time.perf_counter() - t0
    return {"images": n, "resolution": 128, "vae": "tiny AutoencoderKL (16,32,32), downsample 4",
            "text_encoder": "minilm", "seconds_incl_model_load": round(secs, 2), "images_per_s": round(n / secs, 1)}


def main() -> None:
    """Run both benchmarks and write the JSON."""
    p = make_parser("python -m benchmarks.bench_data", __doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2000, help="latent samples for the loader benchmark")
    p.add_argument("--images", type=int, default=128, help="images for the precompute benchmark")
    p.add_argument("--quick", action="store_true", help="name the result data_quick.json (a harness check)")
    add_out_argument(p)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Streaming's lock files go to TMPDIR: keep them inside this run's temp dir.
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = str(tmp)
        write_latent_shards(tmp / "lat", args.samples)
        loader = [bench_loader(tmp / "lat", w) for w in args.workers]
        precompute = bench_precompute(tmp, args.images)
    result = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "loader": loader, "loader_target_samples_per_s_per_worker": 600, "precompute": precompute}
    write_result(args.out, "data_quick" if args.quick else "data", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
