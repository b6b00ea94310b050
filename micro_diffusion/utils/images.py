"""Image helpers shared by training grids, evaluation and the demo: tensors to PIL, grids, atomic PNG writes."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) images in [-1, 1] -> PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equal-size images row-major into one image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def save_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name, then rename: an interrupted run never leaves a half-written image."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    image.save(tmp)
    tmp.replace(path)
