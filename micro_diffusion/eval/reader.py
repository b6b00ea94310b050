"""The scenes' one fixed reader (no weights): every object of an image with its shape, colour and box. GenEval's rule
(eval.geneval_rules) relates the boxes of the compositional scenes; the demo's caption match reads the absolute position
of its single shape from the same box.

Objects stand out from the grey background by their strength: chroma (max - min channel), which no grey has however
shaded, and, when the vocabulary holds white, lightness above the background (the min channel over the border's).
Pixels whose strength passes a floor, both raw and 3x3-averaged (so lone noisy pixels neither join nor start an
object), form 8-connected components; each is an object unless it is too small to be one. Its colour is the
vocabulary's colour nearest the mean of its core (its strongest pixels: edge pixels are mixed with the background).
Its coverage of each pixel is strength over the core's strength (at least half that of the colour's palette entry,
so a washed-out blob does not read as a solid one); its mass, the covered area at the palette entry's full strength,
orders the objects; its box is where coverage reaches one half; its shape is the vocabulary's ideal shape (circle,
square, upright triangle, rectangle of aspect 2:1) whose drawing, fitted to the component's mass and centroid, differs
least from the coverage. Objects are listed largest first, as GenEval lists detections by confidence.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from micro_diffusion.data import shapes as demo
from micro_diffusion.data.drawing import PALETTE, SHAPES
from micro_diffusion.data.scenes import COLOURS, SIZES

_CHROMA_FLOOR = 30.0  # grey backgrounds (and their VAE reconstructions) stay well below; every fill is above 100
_MIN_MASS = 0.25  # an object covers at least this share of the smallest drawn object's area (a small rectangle)
# (shape, area / side**2, centroid below the box centre in sides) of each ideal shape, as data.drawing draws it
_GEOMETRY = (("circle", np.pi / 4, 0.0), ("square", 1.0, 0.0), ("triangle", 0.5, 1 / 6), ("rectangle", 0.5, 0.0))
_SCALES = (0.9, 1.0, 1.1)
_SUB = 4  # subpixel samples per pixel side when drawing a template
_EIGHT = np.ones((3, 3), bool)
ATTRIBUTES = ("colour", "shape", "position")


@dataclass(frozen=True)
class Vocabulary:
    """The colours and shapes a reading may name."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]

    def achromatic(self) -> bool:
        """Whether any colour is grey-like (white), so lightness must find it where chroma cannot."""
        return any(np.ptp(PALETTE[c]) < _CHROMA_FLOOR for c in self.colours)


GENEVAL = Vocabulary(COLOURS, SHAPES)  # the compositional scenes (data.scenes)
DEMO = Vocabulary(demo.COLOURS, demo.SHAPES)  # the demo's single-shape captions (data.shapes)


@dataclass(frozen=True)
class Detection:
    """One object read from an image: shape, colour name, box (x0, y0, x1, y1) in pixels and mass in pixels."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    mass: float


def _templates(hw: tuple[int, int], centre: tuple[float, float], mass: float,
               shapes: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Every ideal shape and scale with this mass and centroid: their names and coverage maps (2 * T, H, W), sharp
    and blurred by a 3x3 mean (as a slightly blurry decoder would draw them)."""
    ys = (np.arange(hw[0] * _SUB) + 0.5) / _SUB - centre[1]
    xs = (np.arange(hw[1] * _SUB) + 0.5) / _SUB - centre[0]
    y, x = np.meshgrid(ys, xs, indexing="ij")  # (H*SUB, W*SUB) offsets from the centroid
    names, inside = [], []
    for shape, area, drop in (g for g in _GEOMETRY if g[0] in shapes):
        for scale in _SCALES:
            side = scale * np.sqrt(mass / area)
            half, yb = side / 2, y + drop * side  # yb: offset from the box centre
            if shape == "circle":
                inside.append(x**2 + yb**2 <= half**2)
            elif shape == "square":
                inside.append((np.abs(x) <= half) & (np.abs(yb) <= half))
            elif shape == "triangle":  # apex at the top centre, base along the bottom
                inside.append((yb <= half) & (np.abs(x) <= (yb + half) / 2))
            else:  # rectangle: twice as wide as high
                inside.append((np.abs(x) <= half) & (np.abs(yb) <= half / 2))
            names.append(shape)
    sharp = np.stack(inside).reshape(len(names), hw[0], _SUB, hw[1], _SUB).mean(axis=(2, 4))  # (T, H, W)
    blurred = ndimage.uniform_filter(sharp, size=(1, 3, 3), mode="nearest")
    return names * 2, np.concatenate([sharp, blurred])


def read_shape(coverage: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> str:
    """The shape whose fitted ideal drawing differs least (squared error) from a coverage map (H, W) in [0, 1]."""
    mass = float(coverage.sum())
    ys, xs = np.indices(coverage.shape) + 0.5
    centre = (float((xs * coverage).sum() / mass), float((ys * coverage).sum() / mass))
    names, templates = _templates(coverage.shape, centre, mass, shapes)
    return names[int(np.argmin(((templates - coverage) ** 2).sum(axis=(1, 2))))]


def nearest_colour(rgb: np.ndarray, colours: tuple[str, ...] = COLOURS) -> str:
    """The colour of `colours` whose palette RGB is nearest an RGB triple."""
    table = np.array([PALETTE[c] for c in colours], np.float32)  # (K, 3)
    return colours[int(np.argmin(np.linalg.norm(table - rgb, axis=-1)))]


def _strength(pixels: np.ndarray, base: float | None) -> np.ndarray:
    """How far pixels (..., 3) stand from a grey background: chroma, or lightness above `base` if that is larger."""
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return chroma if base is None else np.maximum(chroma, pixels.min(axis=-1) - base)


def _border_base(pixels: np.ndarray) -> float:
    """The background's lightness: the median min channel of the border pixels, which no object reaches."""
    low = pixels.min(axis=-1)
    return float(np.median(np.concatenate([low[0], low[-1], low[1:-1, 0], low[1:-1, -1]])))


def read_objects(image: np.ndarray, vocab: Vocabulary = GENEVAL) -> list[Detection]:
    """Every object in a uint8 (H, W, 3) image, named in `vocab`, largest first."""
    pixels = image.astype(np.float32)
    base = _border_base(pixels) if vocab.achromatic() else None
    strength = _strength(pixels, base)  # (H, W)
    smooth = _strength(ndimage.uniform_filter(pixels, size=(3, 3, 1), mode="nearest"), base)  # of the 3x3 mean
    labels, count = ndimage.label((strength > _CHROMA_FLOOR) & (smooth > _CHROMA_FLOOR), structure=_EIGHT)
    min_mass = _MIN_MASS * 0.5 * (min(SIZES.values()) * min(image.shape[:2])) ** 2
    found = []
    for k, window in enumerate(ndimage.find_objects(labels), start=1):
        # the component's window grown by 2 px: room for its faint edge, too little to reach another object
        ys = slice(max(window[0].start - 2, 0), window[0].stop + 2)
        xs = slice(max(window[1].start - 2, 0), window[1].stop + 2)
        own = ndimage.binary_dilation(labels[ys, xs] == k, _EIGHT)
        c = np.where(own, strength[ys, xs], 0.0)
        core = c >= 0.6 * c.max()
        mean = pixels[ys, xs][core].mean(axis=0)
        colour = nearest_colour(mean, vocab.colours)
        full = max(float(_strength(np.array(PALETTE[colour], np.float32), base)), 1.0)  # a fully covered pixel
        # a faint object is judged against its own core, yet never against less than half its colour's strength
        coverage = np.clip(c / max(float(_strength(mean, base)), 0.5 * full, 1.0), 0, 1)
        if coverage.sum() < min_mass:
            continue
        rows, cols = np.nonzero(coverage >= 0.5)
        if not len(rows):
            continue
        box = (float(xs.start + cols.min()), float(ys.start + rows.min()),
               float(xs.start + cols.max() + 1), float(ys.start + rows.max() + 1))
        mass = float(np.clip(c / full, 0, 1).sum())  # the area it covers at its colour's full strength
        found.append(Detection(read_shape(coverage, vocab.shapes), colour, box, mass))
    return sorted(found, key=lambda d: -d.mass)


def by_class(detections: list[Detection]) -> dict[str, list[Detection]]:
    """Detections grouped by shape, each list largest first (GenEval's `objects` dict)."""
    groups: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.mass):
        groups.setdefault(d.shape, []).append(d)
    return groups


# ---------------------------------------------------------------- the demo's captions: one shape, absolute position
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


def read_image(image: np.ndarray) -> dict[str, str | None]:
    """Colour, shape and grid position of the largest object of a uint8 (H, W, 3) demo image; all None if none."""
    found = read_objects(image, DEMO)
    if not found:
        return dict.fromkeys(ATTRIBUTES)
    x0, y0, x1, y1 = found[0].box
    position = demo.position_of(((x0 + x1) / 2, (y0 + y1) / 2), image.shape[0])  # the box centre's cell
    return {"colour": found[0].colour, "shape": found[0].shape, "position": position}


def read_images(images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> list[dict[str, str | None]]:
    """Read every image of a batch (see `as_uint8_images` for the accepted forms)."""
    return [read_image(image) for image in as_uint8_images(images)]


def attribute_accuracy(images: Sequence[Image.Image] | np.ndarray | torch.Tensor,
                       labels: Sequence[demo.SceneLabels]) -> dict[str, float]:
    """Fraction of images whose read colour, shape and position equal their labels, per attribute."""
    reads = read_images(images)
    if len(reads) != len(labels) or not labels:
        raise ValueError(f"need as many labels as images (and at least one): {len(reads)} images, {len(labels)} labels")
    pairs = list(zip(reads, labels, strict=True))
    return {a: float(np.mean([read[a] == getattr(label, a) for read, label in pairs])) for a in ATTRIBUTES}


def caption_match(images: Sequence[Image.Image] | np.ndarray | torch.Tensor,
                  labels: Sequence[demo.SceneLabels]) -> float:
    """Caption-match score: per-attribute correctness averaged over colour, shape and position and over images."""
    return float(np.mean(list(attribute_accuracy(images, labels).values())))


def shuffled_match(images: Sequence[Image.Image] | np.ndarray | torch.Tensor, labels: Sequence[demo.SceneLabels],
                   seed: int = 0) -> float:
    """Caption-match score with the labels randomly permuted: the empirical chance level for these images."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return caption_match(images, [labels[i] for i in order])
