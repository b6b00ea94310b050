"""Seeded single-shape scenes with absolute positions, the CPU demo's data: "a red circle at the top left".

One coloured shape on a plain dark background, drawn by data.drawing in its palette. The attribute sets are small and
closed so that a tiny diffusion model can learn them on CPU in minutes and the fixed reader (eval.reader) can score
generated images against their captions. Sample i of a split depends only on (seed, i), so any prefix of a split is
reproducible on its own. The compositional scenes with GenEval's relations are data.scenes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from micro_diffusion.data.drawing import PALETTE, SceneObject, plain_background, render
from micro_diffusion.data.scenes import COLOURS as SCENE_COLOURS

IMAGE_SIZE = 32
BACKGROUND_LEVEL = 48  # dark grey: every palette colour, white included, stands far from it
# Palette colours far apart in RGB, so blurry generations still map to the right name.
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle")
# (row, column) of each position on the 2x2 grid: cells of 16 px leave room for shapes a 4x-downsampling VAE keeps.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
TRAIN_SEED = 0
HELDOUT_SEED = 1  # a different seed gives a different stream of scenes: the held-out split
_SIZE_RANGE = (0.30, 0.40)  # shape side as a fraction of the image side
_MAX_OFFSET = 0.05  # centre jitter as a fraction of the image side
_COLOUR_JITTER = 12  # per-channel uniform jitter of the fill colour
_CAPTION = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+at\s+the\s+(top|bottom)\s+(left|right)\s*\.?\s*$")


@dataclass(frozen=True)
class SceneLabels:
    """The captioned attributes of one scene."""

    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        """The caption naming colour, shape and position."""
        return f"a {self.colour} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class ShapeScene:
    """One drawable scene: its labels plus the jitter that makes images differ."""

    labels: SceneLabels
    centre: tuple[float, float]  # (x, y) in pixels
    size: float  # side of the shape's bounding box, in pixels
    fill: tuple[int, int, int]

    def drawn(self) -> SceneObject:
        """The shape as data.drawing draws it."""
        half = self.size / 2
        box = (self.centre[0] - half, self.centre[1] - half, self.centre[0] + half, self.centre[1] + half)
        return SceneObject(self.labels.shape, self.labels.colour, self.fill, box)


def parse_caption(caption: str) -> SceneLabels:
    """Read the labels back from a caption written by `SceneLabels.caption`; raises ValueError naming the caption."""
    match = _CAPTION.match(caption.lower())
    if match is None:
        expected = "'a <colour> <shape> at the <top|bottom> <left|right>'"
        raise ValueError(f"cannot parse caption {caption!r}: expected {expected}")
    colour, shape, row, column = match.groups()
    if colour not in COLOURS:
        raise ValueError(f"cannot parse caption {caption!r}: unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if shape not in SHAPES:
        raise ValueError(f"cannot parse caption {caption!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return SceneLabels(colour, shape, f"{row} {column}")


def position_of(centre: tuple[float, float], image_size: int) -> str:
    """The named grid cell holding a point (x, y) in pixels."""
    cell = (int(centre[1] >= image_size / 2), int(centre[0] >= image_size / 2))
    return next(name for name, rc in POSITIONS.items() if rc == cell)


def draw_scene(seed: int, index: int, image_size: int = IMAGE_SIZE) -> ShapeScene:
    """Draw the attributes and jitter of scene `index` of the split `seed`."""
    rng = np.random.default_rng([seed, index])
    labels = SceneLabels(
        colour=COLOURS[rng.integers(len(COLOURS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        position=tuple(POSITIONS)[rng.integers(len(POSITIONS))],
    )
    row, column = POSITIONS[labels.position]
    offset = rng.uniform(-_MAX_OFFSET, _MAX_OFFSET, size=2) * image_size
    centre = ((column + 0.5) * image_size / 2 + offset[0], (row + 0.5) * image_size / 2 + offset[1])
    size = rng.uniform(*_SIZE_RANGE) * image_size
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[labels.colour], jitter, strict=True))
    return ShapeScene(labels, (float(centre[0]), float(centre[1])), float(size), fill)


def render_shape(scene: ShapeScene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """A scene as uint8 (image_size, image_size, 3)."""
    return render((scene.drawn(),), plain_background(BACKGROUND_LEVEL), image_size)


def generate(n: int, seed: int = TRAIN_SEED, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[SceneLabels]]:
    """Generate n scenes of split `seed`: uint8 images (n, H, W, 3) and their labels."""
    scenes = [draw_scene(seed, i, image_size) for i in range(n)]
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render_shape(scene, image_size)
    return images, [s.labels for s in scenes]


def write_folder(
    out_dir: str | Path, n: int, seed: int = TRAIN_SEED, image_size: int = IMAGE_SIZE
) -> list[SceneLabels]:
    """Write n scenes as `<id>.png` + `<id>.txt` (caption): data_prep.convert's `folder` layout; return the labels."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = []
    width = max(6, len(str(n - 1)))
    for i in range(n):
        scene = draw_scene(seed, i, image_size)
        stem = f"shape_{seed}_{i:0{width}d}"
        Image.fromarray(render_shape(scene, image_size)).save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(scene.labels.caption() + "\n", encoding="utf-8")
        labels.append(scene.labels)
    return labels


def chance_level() -> float:
    """Expected caption-match score of an image unrelated to its caption: mean of 1/K over the three attributes."""
    return float(np.mean([1 / len(COLOURS), 1 / len(SHAPES), 1 / len(POSITIONS)]))


def geneval_lines(labels: SceneLabels) -> list[dict[str, Any]]:
    """The GenEval metadata lines a caption covers: single_object (the shape, once) and colors (in that colour).

    GenEval's position task relates two objects, so absolute positions have no counterpart, and a white shape none at
    all: the compositional scenes (data.scenes) leave white out.
    """
    if labels.colour not in SCENE_COLOURS:
        return []
    prompt = f"a photo of a {labels.colour} {labels.shape}"
    return [{"tag": "single_object", "include": [{"class": labels.shape, "count": 1}], "prompt": prompt},
            {"tag": "colors", "include": [{"class": labels.shape, "count": 1, "color": labels.colour}],
             "prompt": prompt}]
