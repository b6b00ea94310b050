"""Benchmark: compositional scenes drawn per second and the GenEval-style reader's images per second (one core).

    .venv/bin/python -m benchmarks.bench_compose [--scenes 2000] [--sizes 64 32]

Writes OUT/compose.json (`--out`, default benchmarks/results). The target: at least 500 scenes/s on one core
at 64 px (drawing only: the prompt, the layout and the raster, no file writes).
"""
from __future__ import annotations

import json
import os
import platform
import time

from benchmarks.common import add_out_argument, write_result
from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.scenes import split_scene
from micro_diffusion.eval.reader import read_objects
from micro_diffusion.utils.argparsing import parser as make_parser


def measure(scenes: int, size: int) -> dict:
    """Scenes/s of drawing (train split) and images/s of the reader on them, at one size."""
    start = time.perf_counter()
    images = [render_scene(split_scene("train", 0, i, size)) for i in range(scenes)]
    draw_s = time.perf_counter() - start
    start = time.perf_counter()
    objects = sum(len(read_objects(im)) for im in images)
    read_s = time.perf_counter() - start
    return {"size": size, "scenes": scenes, "objects": objects, "draw_seconds": round(draw_s, 4),
            "scenes_per_s": round(scenes / draw_s, 1), "read_seconds": round(read_s, 4),
            "reader_images_per_s": round(scenes / read_s, 1)}


def main(argv: list[str] | None = None) -> None:
    """Time drawing and reading at each size; write the JSON result."""
    p = make_parser("python -m benchmarks.bench_compose", __doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=2000, help="scenes drawn and read per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 32], help="image sides in pixels")
    p.add_argument("--quick", action="store_true", help="name the result compose_quick.json (a harness check)")
    add_out_argument(p)
    args = p.parse_args(argv)
    runs = [measure(args.scenes, size) for size in args.sizes]  # one process: one core
    result = {"benchmark": "compose", "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "target_scenes_per_s": 500, "runs": runs}
    write_result(args.out, "compose_quick" if args.quick else "compose", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
