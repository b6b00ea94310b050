"""Rasterise a compositional scene (micro_diffusion.data.scenes) to an RGB image: anti-aliased shapes on grey.

Shapes are drawn 4x larger and box-filtered down: each pixel's colour is the covered share of the fill plus the rest
of the background (objects never overlap, so premultiplied colour and coverage add up exactly).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from micro_diffusion.data.scenes import Scene, SceneObject

SUPERSAMPLE = 4


def outline(obj: SceneObject, scale: float = 1.0) -> tuple[str, list[tuple[float, float]]]:
    """How PIL draws an object: ("ellipse" | "polygon", points), in pixels times scale."""
    x0, y0, x1, y1 = (v * scale for v in obj.box)
    cx = (x0 + x1) / 2
    if obj.shape == "circle":
        return "ellipse", [(x0, y0), (x1, y1)]
    if obj.shape in ("square", "rectangle"):
        return "polygon", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if obj.shape == "triangle":  # upright: apex at the top centre, base along the bottom
        return "polygon", [(cx, y0), (x1, y1), (x0, y1)]
    raise ValueError(f"unknown shape {obj.shape!r}")


def background(scene: Scene) -> np.ndarray:
    """The scene's grey background as float (H, W): level, a linear gradient and luminance noise (no chroma)."""
    bg, size = scene.background, scene.size
    u = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.cos(bg["angle"]) * u[None, :] + np.sin(bg["angle"]) * u[:, None]  # (H, W), -0.7 .. 0.7
    grey = bg["level"] + bg["gradient"] * ramp
    if bg["noise"]:
        grey = grey + np.random.default_rng(bg["noise_seed"]).normal(0, bg["noise"], (size, size))
    return grey


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 (H, W, 3)."""
    big = scene.size * SUPERSAMPLE
    colour = Image.new("RGB", (big, big), (0, 0, 0))
    cover = Image.new("L", (big, big), 0)
    paint, mask = ImageDraw.Draw(colour), ImageDraw.Draw(cover)
    for obj in scene.objects:
        kind, points = outline(obj, SUPERSAMPLE)
        for draw, fill in ((paint, obj.fill), (mask, 255)):
            (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=fill)
    small = (scene.size, scene.size)
    premultiplied = np.asarray(colour.resize(small, Image.Resampling.BOX), np.float32)  # (H, W, 3)
    alpha = np.asarray(cover.resize(small, Image.Resampling.BOX), np.float32)[..., None] / 255  # (H, W, 1)
    image = background(scene)[..., None] * (1 - alpha) + premultiplied
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
