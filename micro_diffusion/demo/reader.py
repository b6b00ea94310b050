"""A fixed, hand-written reader (no weights) that reads colour, shape and position back from a shape-scene image.

It scores how well generated images match their captions: segment the pixels nearer to a palette colour than to the
background (estimated from the border, so a tinted background still works), keep the largest connected blob (so stray
noise does not count), then position from the blob's centroid, colour from its core's mean mapped to the nearest
palette colour, and shape from geometry: an upright triangle has far less mass in its top half than its bottom half,
and a square fills its bounding box where a circle fills about pi/4 of it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from micro_diffusion.demo.shapes import PALETTE, POSITIONS, SceneLabels, chance_level

ATTRIBUTES = ("colour", "shape", "position")
_PALETTE = np.array(list(PALETTE.values()), dtype=np.float32)  # (K, 3)
_COLOUR_NAMES = list(PALETTE)
_PALETTE_BY_NAME = {name: np.array(rgb, dtype=np.float32) for name, rgb in PALETTE.items()}
# (shape, area / side**2, how far the centroid lies below the bounding-box centre in sides) of each ideal shape
_SHAPE_GEOMETRY = (("circle", np.pi / 4, 0.0), ("square", 1.0, 0.0), ("triangle", 0.5, 1 / 6))
_MIN_BLOB_PIXELS = 4  # smaller blobs are noise, not a shape


def as_uint8_images(images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Images as uint8 (N, H, W, 3) from PIL images, a uint8 array or a float (N, 3, H, W) tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) tensor in [-1, 1], got shape {tuple(images.shape)}")
        scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
        return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (N, H, W, 3) array, got {images.dtype} of shape {images.shape}")
        return images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False when the mask is empty)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _box_blur(values: np.ndarray) -> np.ndarray:
    """3x3 mean of a (H, W) map (edges repeated), so single noisy pixels neither join nor split the blob."""
    padded = np.pad(values, 1, mode="edge")
    height, width = values.shape
    return sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 9


def _background(image: np.ndarray) -> np.ndarray:
    """The background colour: the median of the border pixels, which the shape never fills."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _coverage(shape: str, centre: tuple[float, float], size: float, hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each pixel an ideal shape covers (4x4 subpixel samples), drawn the way the generator draws it."""
    sub = 4
    ys = (np.arange(hw[0] * sub) + 0.5) / sub - centre[1]
    xs = (np.arange(hw[1] * sub) + 0.5) / sub - centre[0]
    y, x = np.meshgrid(ys, xs, indexing="ij")
    half = size / 2
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    else:  # upright triangle: apex at the top centre, base along the bottom edge
        inside = (y <= half) & (np.abs(x) <= (y + half) / 2)
    return inside.reshape(hw[0], sub, hw[1], sub).mean(axis=(1, 3))


def _read_shape(occupancy: np.ndarray) -> str:
    """The shape whose ideal drawing, fitted to the blob's mass and centroid, differs least from the occupancy map."""
    mass = occupancy.sum()
    ys, xs = np.indices(occupancy.shape) + 0.5
    centre = (float((xs * occupancy).sum() / mass), float((ys * occupancy).sum() / mass))
    best, best_error = "", np.inf
    for shape, area_per_size2, centroid_drop in _SHAPE_GEOMETRY:
        for scale in (0.9, 1.0, 1.1):
            size = scale * np.sqrt(mass / area_per_size2)
            template = _coverage(shape, (centre[0], centre[1] - centroid_drop * size), size, occupancy.shape)
            for blurred in (template, _box_blur(template)):
                error = float(np.sum((blurred - occupancy) ** 2))
                if error < best_error:
                    best, best_error = shape, error
    return best


def _read_position(blob: np.ndarray) -> str:
    """The grid cell holding the blob's centroid."""
    ys, xs = np.nonzero(blob)
    height, width = blob.shape
    cell = (int(ys.mean() >= height / 2), int(xs.mean() >= width / 2))
    return next(name for name, rc in POSITIONS.items() if rc == cell)


def read_image(image: np.ndarray) -> dict[str, str | None]:
    """Read colour, shape and position from one uint8 (H, W, 3) image; all None when no shape is found."""
    pixels = image.astype(np.float32)
    background = _background(image)
    to_background = np.linalg.norm(pixels - background, axis=-1)  # (H, W)
    to_palette = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, K)
    blob = _largest_blob(_box_blur(to_background - to_palette.min(axis=-1)) > 0)
    if blob.sum() < _MIN_BLOB_PIXELS:
        return dict.fromkeys(ATTRIBUTES)
    # The core (pixels far from the background) gives the colour: edge pixels are mixed with the background.
    strength = np.where(blob, to_background, 0.0)
    core = strength >= 0.5 * strength.max()
    mean = pixels[core].mean(axis=0)
    colour = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - mean, axis=-1)))]
    # Occupancy: how much of each pixel the shape covers, judged from its distance to the background.
    reach = _box_blur(_box_blur(blob.astype(np.float32))) > 0  # the blob grown by 2 px, so far noise is ignored
    contrast = np.linalg.norm(_PALETTE_BY_NAME[colour] - background)
    occupancy = np.where(reach, np.clip(to_background / contrast, 0, 1), 0.0)
    # The shape fit only needs the blob's surroundings: cropping makes it several times faster.
    ys, xs = np.nonzero(reach)
    crop = occupancy[max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4]
    return {"colour": colour, "shape": _read_shape(crop), "position": _read_position(blob)}


def read_images(images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> list[dict[str, str | None]]:
    """Read every image of a batch (see `as_uint8_images` for the accepted forms)."""
    return [read_image(image) for image in as_uint8_images(images)]


def attribute_accuracy(
    images: Sequence[Image.Image] | np.ndarray | torch.Tensor, labels: Sequence[SceneLabels]
) -> dict[str, float]:
    """Fraction of images whose read colour, shape and position equal their labels, per attribute."""
    reads = read_images(images)
    if len(reads) != len(labels) or not labels:
        raise ValueError(f"need as many labels as images (and at least one): {len(reads)} images, {len(labels)} labels")
    pairs = list(zip(reads, labels, strict=True))
    return {a: float(np.mean([read[a] == getattr(label, a) for read, label in pairs])) for a in ATTRIBUTES}


def caption_match(images: Sequence[Image.Image] | np.ndarray | torch.Tensor, labels: Sequence[SceneLabels]) -> float:
    """Caption-match score: per-attribute correctness averaged over colour, shape and position and over images."""
    return float(np.mean(list(attribute_accuracy(images, labels).values())))


def shuffled_match(
    images: Sequence[Image.Image] | np.ndarray | torch.Tensor, labels: Sequence[SceneLabels], seed: int = 0
) -> float:
    """Caption-match score with the labels randomly permuted: the empirical chance level for these images."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return caption_match(images, [labels[i] for i in order])


__all__ = [
    "ATTRIBUTES",
    "as_uint8_images",
    "attribute_accuracy",
    "caption_match",
    "chance_level",
    "read_image",
    "read_images",
    "shuffled_match",
]
