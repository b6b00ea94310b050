"""The demo's captions in GenEval's format, scored by the compositional benchmark's reader and rule.

A demo caption ("a red circle at the top left") names one shape, its colour and an absolute position. It covers two
GenEval tasks: single_object (the shape, once) and colors (the shape, once, in that colour). GenEval's position task
relates two objects, so the demo's absolute positions have no GenEval counterpart, and white shapes are left out: the
reader finds objects by their saturation (eval.compose_reader), and the benchmark's palette has no white.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from micro_diffusion.data.scenes import PALETTE
from micro_diffusion.eval.compose import judge, summarise

from .shapes import SceneLabels


def metadata_lines(labels: SceneLabels) -> list[dict]:
    """The GenEval metadata lines a demo caption covers (none for a colour the benchmark does not draw)."""
    if labels.colour not in PALETTE:
        return []
    prompt = f"a photo of a {labels.colour} {labels.shape}"
    return [{"tag": "single_object", "include": [{"class": labels.shape, "count": 1}], "prompt": prompt},
            {"tag": "colors", "include": [{"class": labels.shape, "count": 1, "color": labels.colour}],
             "prompt": prompt}]


def geneval_score(images: np.ndarray, labels: Sequence[SceneLabels]) -> dict:
    """GenEval-style tasks and overall of uint8 (N, H, W, 3) images against their captions' labels."""
    lines = [metadata_lines(lab) for lab in labels]
    pairs = [(im, line) for im, covered in zip(images, lines, strict=True) for line in covered]
    if not pairs:
        raise ValueError("no demo caption maps to a GenEval task (every shape is white?)")
    correct = judge([p[0] for p in pairs], [p[1] for p in pairs])
    scored = sum(bool(covered) for covered in lines)
    return {**summarise([p[1]["tag"] for p in pairs], correct), "images": scored, "left_out": len(labels) - scored}
