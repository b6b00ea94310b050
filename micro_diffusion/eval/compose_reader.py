"""A fixed reader (no weights) that finds the objects of a compositional scene: GenEval's detector, for our scenes.

Every scene colour is saturated and the background is grey, so chroma (max - min channel) separates objects from the
background, however it is shaded. Pixels of chroma above a floor form connected components (8-connected); each is an
object unless it is too small to be one (noise). Its colour is the palette colour nearest the mean of its core (its
most saturated pixels: edge pixels are mixed with grey). Its coverage of each pixel is chroma over the core's chroma;
its box is where that coverage reaches one half; its shape is the ideal shape (circle, square, upright triangle,
rectangle of aspect 2:1) whose drawing, fitted to the component's mass and centroid, differs least from the coverage.
Objects of a class are listed largest first, as GenEval lists detections by confidence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from micro_diffusion.data.scenes import PALETTE, SIZES

_PALETTE = np.array(list(PALETTE.values()), np.float32)  # (K, 3)
_COLOUR_NAMES = list(PALETTE)
_CHROMA_FLOOR = 30.0  # grey backgrounds (and their VAE reconstructions) stay well below; every fill is above 100
_MIN_MASS = 0.25  # an object covers at least this share of the smallest drawn object's area (a small rectangle)
# (shape, area / side**2, centroid below the box centre in sides) of each ideal shape, as data.drawing draws it
_GEOMETRY = (("circle", np.pi / 4, 0.0), ("square", 1.0, 0.0), ("triangle", 0.5, 1 / 6), ("rectangle", 0.5, 0.0))
_SCALES = (0.9, 1.0, 1.1)
_SUB = 4  # subpixel samples per pixel side when drawing a template
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Detection:
    """One object read from an image: shape, colour name, box (x0, y0, x1, y1) in pixels and mass in pixels."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    mass: float


def _templates(hw: tuple[int, int], centre: tuple[float, float], mass: float) -> tuple[list[str], np.ndarray]:
    """Every ideal shape and scale with this mass and centroid: their names and coverage maps (2 * 12, H, W), sharp
    and blurred by a 3x3 mean (as a slightly blurry decoder would draw them)."""
    ys = (np.arange(hw[0] * _SUB) + 0.5) / _SUB - centre[1]
    xs = (np.arange(hw[1] * _SUB) + 0.5) / _SUB - centre[0]
    y, x = np.meshgrid(ys, xs, indexing="ij")  # (H*SUB, W*SUB) offsets from the centroid
    names, inside = [], []
    for shape, area, drop in _GEOMETRY:
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


def read_shape(coverage: np.ndarray) -> str:
    """The shape whose fitted ideal drawing differs least (squared error) from a coverage map (H, W) in [0, 1]."""
    mass = float(coverage.sum())
    ys, xs = np.indices(coverage.shape) + 0.5
    centre = (float((xs * coverage).sum() / mass), float((ys * coverage).sum() / mass))
    names, templates = _templates(coverage.shape, centre, mass)
    return names[int(np.argmin(((templates - coverage) ** 2).sum(axis=(1, 2))))]


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest an RGB triple."""
    return _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def read_objects(image: np.ndarray) -> list[Detection]:
    """Every object in a uint8 (H, W, 3) image, largest first."""
    pixels = image.astype(np.float32)
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)  # (H, W)
    labels, count = ndimage.label(chroma > _CHROMA_FLOOR, structure=_EIGHT)
    min_mass = _MIN_MASS * 0.5 * (min(SIZES.values()) * min(image.shape[:2])) ** 2
    found = []
    for k, window in enumerate(ndimage.find_objects(labels), start=1):
        # the component's window grown by 2 px: room for its faint edge, too little to reach another object
        ys = slice(max(window[0].start - 2, 0), window[0].stop + 2)
        xs = slice(max(window[1].start - 2, 0), window[1].stop + 2)
        own = ndimage.binary_dilation(labels[ys, xs] == k, _EIGHT)
        c = np.where(own, chroma[ys, xs], 0.0)
        core = c >= 0.6 * c.max()
        mean = pixels[ys, xs][core].mean(axis=0)
        coverage = np.clip(c / max(float(mean.max() - mean.min()), 1.0), 0, 1)
        if coverage.sum() < min_mass:
            continue
        rows, cols = np.nonzero(coverage >= 0.5)
        if not len(rows):
            continue
        box = (float(xs.start + cols.min()), float(ys.start + rows.min()),
               float(xs.start + cols.max() + 1), float(ys.start + rows.max() + 1))
        found.append(Detection(read_shape(coverage), nearest_colour(mean), box, float(coverage.sum())))
    return sorted(found, key=lambda d: -d.mass)


def by_class(detections: list[Detection]) -> dict[str, list[Detection]]:
    """Detections grouped by shape, each list largest first (GenEval's `objects` dict)."""
    groups: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.mass):
        groups.setdefault(d.shape, []).append(d)
    return groups
