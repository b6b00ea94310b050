"""Benchmark: data_prep.convert throughput (images/s) on generated JPEGs; writes OUT/convert.json.

    .venv/bin/python benchmarks/bench_convert.py --images 400 --workers 2
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
from PIL import Image

from benchmarks.common import add_out_argument, write_result
from data_prep.convert import convert
from micro_diffusion.utils.argparsing import parser as make_parser


def make_folder(root: Path, n: int, size: tuple[int, int]) -> None:
    """n random-noise JPEGs of `size` (w, h), each with a caption .txt."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.roll(base, i, axis=1)).save(buf, format="JPEG", quality=90)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (root / f"{i:06d}.txt").write_text(f"generated image {i}")


def main() -> None:
    """Time convert on generated images for each worker count; write the JSON results."""
    p = make_parser("python -m benchmarks.bench_convert", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="generated images converted")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels")
    p.add_argument("--height", type=int, default=768, help="image height in pixels")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to measure")
    p.add_argument("--quick", action="store_true", help="name the result convert_quick.json (a harness check)")
    add_out_argument(p)
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        make_folder(src, args.images, (args.width, args.height))
        convert(src, Path(tmp) / "warm", "folder", workers=0, progress=False)  # imports streaming once, untimed
        for workers in args.workers:
            out = Path(tmp) / f"out{workers}"
            t0 = time.perf_counter()
            convert(src, out, "folder", workers=workers, progress=False)
            dt = time.perf_counter() - t0
            runs.append({"workers": workers, "seconds": round(dt, 3), "images_per_s": round(args.images / dt, 1)})
    result = {"benchmark": "convert", "images": args.images, "input_size": [args.width, args.height],
              "max_side": 512, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "runs": runs}
    write_result(args.out, "convert_quick" if args.quick else "convert", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
