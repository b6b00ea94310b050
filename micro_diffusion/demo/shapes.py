"""Seeded generator of captioned scenes: one coloured shape on a plain background, e.g. "a red circle at the top left".

The attribute sets are small and closed so that a tiny diffusion model can learn them on CPU in minutes and a fixed
hand-written reader (`micro_diffusion.demo.reader`) can score generated images against their captions.
Sample i of a split depends only on (seed, i), so any prefix of a split is reproducible on its own.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (48, 48, 48)
# Well separated in RGB and all far from the dark background, so blurry generations still map to the right name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (170, 60, 210),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
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
_SUPERSAMPLE = 4  # drawn 4x larger then downsampled, for anti-aliased edges
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
class Scene:
    """One drawable scene: its labels plus the jitter that makes images differ."""

    labels: SceneLabels
    centre: tuple[float, float]  # (x, y) in pixels
    size: float  # side of the shape's bounding box, in pixels
    fill: tuple[int, int, int]


def parse_caption(caption: str) -> SceneLabels:
    """Read the labels back from a caption written by `SceneLabels.caption`; raises ValueError naming the caption."""
    match = _CAPTION.match(caption.lower())
    if match is None:
        expected = "'a <colour> <shape> at the <top|bottom> <left|right>'"
        raise ValueError(f"cannot parse caption {caption!r}: expected {expected}")
    colour, shape, row, column = match.groups()
    if colour not in PALETTE:
        raise ValueError(f"cannot parse caption {caption!r}: unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if shape not in SHAPES:
        raise ValueError(f"cannot parse caption {caption!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return SceneLabels(colour, shape, f"{row} {column}")


def draw_scene(seed: int, index: int, image_size: int = IMAGE_SIZE) -> Scene:
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
    return Scene(labels, (float(centre[0]), float(centre[1])), float(size), fill)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene as an RGB image of image_size x image_size pixels."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = (c * _SUPERSAMPLE for c in scene.centre)
    half = scene.size * _SUPERSAMPLE / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene.labels.shape == "circle":
        draw.ellipse(box, fill=scene.fill)
    elif scene.labels.shape == "square":
        draw.rectangle(box, fill=scene.fill)
    elif scene.labels.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=scene.fill)
    else:
        raise ValueError(f"unknown shape {scene.labels.shape!r} (known: {', '.join(SHAPES)})")
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def generate(n: int, seed: int = TRAIN_SEED, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[SceneLabels]]:
    """Generate n scenes of split `seed`: uint8 images (n, H, W, 3) and their labels."""
    scenes = [draw_scene(seed, i, image_size) for i in range(n)]
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = np.asarray(render(scene, image_size))
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
        render(scene, image_size).save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(scene.labels.caption() + "\n", encoding="utf-8")
        labels.append(scene.labels)
    return labels


def chance_level() -> float:
    """Expected caption-match score of an image unrelated to its caption: mean of 1/K over the three attributes."""
    return float(np.mean([1 / len(COLOURS), 1 / len(SHAPES), 1 / len(POSITIONS)]))


def main(argv: list[str] | None = None) -> None:
    """Command line: write a split of captioned scenes to a folder (`python -m micro_diffusion.demo.shapes --help`)."""
    parser = argparse.ArgumentParser(description="Write captioned shape scenes as PNG + same-stem .txt caption files.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of scenes")
    split_help = f"split seed ({TRAIN_SEED}: train, {HELDOUT_SEED}: held out)"
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help=split_help)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    args = parser.parse_args(argv)
    write_folder(args.out, args.n, args.seed, args.image_size)
    print(f"wrote {args.n} scenes (seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
