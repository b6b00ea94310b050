"""Seeded compositional scenes with GenEval-format prompts: 1 to 4 shapes in 8 of GenEval's colours, two sizes.

A scene is its GenEval metadata line (tag, include with class/count/color, exclude, position, prompt) plus the objects
drawn to satisfy it. The six tasks use GenEval's caption templates (prompts/create_prompts.py of djghosh13/geneval):

    single_object  "a photo of a circle"                    one object, any colour
    two_object     "a photo of a circle and a square"       two different shapes
    counting       "a photo of three triangles"             2 to 4 of one shape; exclude count N+1
    colors         "a photo of a red circle"
    position       "a photo of a circle left of a square"   left of, right of, above, below (GenEval's margin rule)
    color_attr     "a photo of a red circle and a blue square"

Each scene holds exactly the objects its prompt names (unnamed colours drawn at random). Splits:
- train: tasks uniformly at random; prompt and drawing of scene i depend on (seed, i). Objects never take a colour-shape
  pair of NOVEL_PAIRS unless include_novel is set.
- heldout: a fixed prompt list (prompt i depends on HELDOUT_SEED and i only) with GenEval's task proportions
  (80/99/80/94/100/100 of 553), free of NOVEL_PAIRS; the seed only changes how the prompts are drawn (positions,
  sizes, colours left unnamed, jitter).
- novel: a fixed prompt list (NOVEL_SEED) of colors and color_attr prompts that each name a pair of NOVEL_PAIRS.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from micro_diffusion.data.drawing import ASPECT, PALETTE, SHAPES, SceneObject

# The scenes draw GenEval's shapes (data.drawing.SHAPES) in eight of GenEval's ten colours: black and white are left
# out so that every object is saturated and the background (achromatic grey) leaves all eight visible; the reader
# segments them by chroma.
COLOURS = tuple(c for c in PALETTE if c != "white")
SIZES = {"small": 0.20, "large": 0.30}  # width of an object's bounding box, as a fraction of the image side
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_TASK_PROMPTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                        "color_attr": 100}  # GenEval's 553 prompts by task: the held-out split's proportions
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four")
# Colour-shape pairs the training split leaves out: the novel split prompts for them (one pair per shape and colour).
NOVEL_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "rectangle"))
SPLITS = ("train", "heldout", "novel")
HELDOUT_SEED = 1
NOVEL_SEED = 2
POSITION_THRESHOLD = 0.1  # GenEval's default margin (evaluate_images.py option position_threshold)
_STRICT_THRESHOLD = 0.25  # drawn relations hold with this wider margin, so a box read 1 px off still passes
_SPLIT_KEY = {"train": 0, "heldout": 1, "novel": 2}  # keeps the random streams of the splits apart
_JITTER = {"size": 0.05, "colour": 10}  # relative size jitter; per-channel fill jitter
_BORDER = 0.04  # free margin at the image edge, as a fraction of the side
_GAP = 0.06  # least gap between two objects' boxes, as a fraction of the side


@dataclass(frozen=True)
class Scene:
    """A GenEval metadata line and the objects drawn for it, on a background of `background` grey and texture."""

    metadata: dict[str, Any]
    objects: tuple[SceneObject, ...]
    background: dict[str, Any]
    size: int


def with_article(word: str) -> str:
    """'a circle', 'an orange circle' (GenEval's with_article)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(shape: str) -> str:
    """'circles' (GenEval's make_plural; no shape name here ends in s)."""
    return f"{shape}es" if shape.endswith("s") else f"{shape}s"


def relative_position(box_a: tuple[float, ...], box_b: tuple[float, ...],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B by GenEval's rule: the centre offset, each axis shrunk by threshold times the two
    boxes' summed extent on that axis (clipped at zero), then divided by the unshrunk offset's length; a relation holds
    where that axis's share exceeds 0.5 (image y grows downwards: above is negative). None when nothing is left."""
    a, b = np.asarray(box_a[:4], float), np.asarray(box_b[:4], float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2  # (dx, dy) of the centres
    extent = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * extent, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


# ---------------------------------------------------------------- prompts (GenEval metadata lines)
def _pick(rng: np.random.Generator, options: tuple[str, ...] | list, k: int = 1) -> list:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _allowed_pairs(include_novel: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if include_novel or (c, s) not in NOVEL_PAIRS]


def prompt_metadata(task: str, rng: np.random.Generator, include_novel: bool = False) -> dict[str, Any]:
    """A GenEval metadata line of `task` drawn from rng; named colour-shape pairs avoid NOVEL_PAIRS unless included."""
    if task == "single_object":
        (shape,) = _pick(rng, SHAPES)
        return {"tag": task, "include": [{"class": shape, "count": 1}], "prompt": f"a photo of {with_article(shape)}"}
    if task == "two_object":
        a, b = _pick(rng, SHAPES, 2)
        return {"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}
    if task == "counting":
        (shape,) = _pick(rng, SHAPES)
        n = int(rng.integers(2, 4, endpoint=True))
        return {"tag": task, "include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}],
                "prompt": f"a photo of {NUMBERS[n]} {plural(shape)}"}
    if task == "position":
        a, b = _pick(rng, SHAPES, 2)
        (rel,) = _pick(rng, RELATIONS)
        return {"tag": task, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"}
    pairs = _allowed_pairs(include_novel)
    if task == "colors":
        colour, shape = pairs[rng.integers(len(pairs))]
        return {"tag": task, "include": [{"class": shape, "count": 1, "color": colour}],
                "prompt": f"a photo of {with_article(colour)} {shape}"}
    if task == "color_attr":
        while True:  # two different shapes in two different colours, as GenEval draws them
            (ca, sa), (cb, sb) = (pairs[i] for i in rng.choice(len(pairs), size=2, replace=False))
            if ca != cb and sa != sb:
                break
        include = [{"class": sa, "count": 1, "color": ca}, {"class": sb, "count": 1, "color": cb}]
        return {"tag": task, "include": include,
                "prompt": f"a photo of {with_article(ca)} {sa} and {with_article(cb)} {sb}"}
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def _novel_metadata(rng: np.random.Generator) -> dict[str, Any]:
    """A colors or color_attr line naming at least one NOVEL_PAIRS pair."""
    colour, shape = NOVEL_PAIRS[rng.integers(len(NOVEL_PAIRS))]
    if rng.random() < 0.5:
        return {"tag": "colors", "include": [{"class": shape, "count": 1, "color": colour}],
                "prompt": f"a photo of {with_article(colour)} {shape}"}
    others = [(c, s) for c, s in _allowed_pairs(True) if c != colour and s != shape]
    other = others[rng.integers(len(others))]
    first, second = ((colour, shape), other) if rng.random() < 0.5 else (other, (colour, shape))
    return {"tag": "color_attr",
            "include": [{"class": first[1], "count": 1, "color": first[0]},
                        {"class": second[1], "count": 1, "color": second[0]}],
            "prompt": f"a photo of {with_article(first[0])} {first[1]} and {with_article(second[0])} {second[1]}"}


def split_prompt(split: str, seed: int, index: int, include_novel: bool = False) -> dict[str, Any]:
    """GenEval metadata line `index` of a split (train: of the split seeded `seed`; heldout and novel: fixed lists)."""
    if split == "train":
        rng = np.random.default_rng([_SPLIT_KEY[split], seed, index])
        return prompt_metadata(TASKS[rng.integers(len(TASKS))], rng, include_novel)
    if split == "heldout":
        rng = np.random.default_rng([_SPLIT_KEY[split], HELDOUT_SEED, index])
        weights = np.array(list(GENEVAL_TASK_PROMPTS.values()), float)
        task = list(GENEVAL_TASK_PROMPTS)[rng.choice(len(weights), p=weights / weights.sum())]
        return prompt_metadata(task, rng, include_novel=False)
    if split == "novel":
        return _novel_metadata(np.random.default_rng([_SPLIT_KEY[split], NOVEL_SEED, index]))
    raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")


# ---------------------------------------------------------------- objects that satisfy a metadata line
def check_metadata(metadata: dict[str, Any], where: str = "metadata") -> None:
    """Refuse a line the scenes cannot draw (unknown tag, class or colour), naming the value and where it is."""
    if metadata.get("tag") not in TASKS:
        raise ValueError(f"{where}: unknown tag {metadata.get('tag')!r} (known: {', '.join(TASKS)})")
    for req in [*metadata.get("include", []), *metadata.get("exclude", [])]:
        if req.get("class") not in SHAPES:
            raise ValueError(f"{where}: class {req.get('class')!r} is not a scene shape (known: {', '.join(SHAPES)})")
        if "color" in req and req["color"] not in COLOURS:
            raise ValueError(f"{where}: color {req['color']!r} is not a scene colour (known: {', '.join(COLOURS)})")
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"{where}: count {req.get('count')!r} of class {req['class']!r} is not a positive integer")


def _wanted(metadata: dict[str, Any], rng: np.random.Generator, include_novel: bool) -> list[tuple[str, str]]:
    """(shape, colour) of every object the line names: `count` of each include, unnamed colours drawn at random."""
    wanted = []
    for req in metadata.get("include", []):
        for _ in range(req["count"]):
            colours = [c for c in COLOURS if include_novel or (c, req["class"]) not in NOVEL_PAIRS]
            wanted.append((req["class"], req.get("color") or colours[rng.integers(len(colours))]))
    return wanted


def _separate(box: np.ndarray, boxes: list[np.ndarray], gap: float) -> bool:
    return all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
               for b in boxes)


def _relations_hold(metadata: dict[str, Any], boxes: list[np.ndarray]) -> bool:
    """Every position clause of the line holds between the drawn boxes, with the stricter margin."""
    start, firsts = 0, []
    for req in metadata.get("include", []):
        firsts.append(start)
        start += req["count"]
    for i, req in enumerate(metadata.get("include", [])):
        if "position" in req:
            rel, target = req["position"]
            if rel not in relative_position(boxes[firsts[i]], boxes[firsts[target]], _STRICT_THRESHOLD):
                return False
    return True


def place_objects(metadata: dict[str, Any], rng: np.random.Generator, size: int,
                  include_novel: bool = False) -> tuple[SceneObject, ...]:
    """Objects for a metadata line: non-overlapping boxes (a gap between them), relations held with a margin."""
    wanted = _wanted(metadata, rng, include_novel)
    border, gap = _BORDER * size, _GAP * size
    for _ in range(200):
        boxes: list[np.ndarray] = []
        for shape, _colour in wanted:
            side = SIZES[("small", "large")[rng.integers(2)]] * size * (1 + rng.uniform(-1, 1) * _JITTER["size"])
            height = side * ASPECT.get(shape, 1.0)
            for _try in range(50):
                x0 = rng.uniform(border, size - border - side)
                y0 = rng.uniform(border, size - border - height)
                box = np.array([x0, y0, x0 + side, y0 + height])
                if _separate(box, boxes, gap):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(wanted) and _relations_hold(metadata, boxes):
            jitter = rng.integers(-_JITTER["colour"], _JITTER["colour"] + 1, size=(len(wanted), 3))
            return tuple(SceneObject(shape, colour, tuple(int(v) for v in np.clip(np.add(PALETTE[colour], j), 0, 255)),
                                     tuple(float(v) for v in box))
                         for (shape, colour), box, j in zip(wanted, boxes, jitter, strict=True))
    raise RuntimeError(f"could not place the objects of {metadata['prompt']!r} at {size} px in 200 tries")


def draw_background(rng: np.random.Generator) -> dict[str, Any]:
    """Plain or mildly textured grey: level, gradient (per image side, direction) and luminance-noise amplitude."""
    textured = bool(rng.random() < 0.5)
    return {"level": float(rng.uniform(105, 150)), "gradient": float(rng.uniform(6, 14)) if textured else 0.0,
            "angle": float(rng.uniform(0, 2 * np.pi)), "noise": 3.0 if textured else 0.0,
            "noise_seed": int(rng.integers(2**31))}


def scene_for(metadata: dict[str, Any], rng: np.random.Generator, size: int, include_novel: bool = False) -> Scene:
    """A scene drawing a metadata line (its objects and background come from rng)."""
    if size < 16:
        raise ValueError(f"scene size {size} px is too small (at least 16)")
    objects = place_objects(metadata, rng, size, include_novel)
    return Scene(copy.deepcopy(metadata), objects, draw_background(rng), size)


def rendering_rng(split: str, seed: int, index: int, image: int = 0) -> np.random.Generator:
    """The random stream that draws image `image` of prompt `index` of a split seeded `seed`."""
    return np.random.default_rng([_SPLIT_KEY[split], seed, index, image, 1])


def split_scene(split: str, seed: int, index: int, size: int = 64, image: int = 0,
                include_novel: bool = False) -> Scene:
    """Scene `index` of a split seeded `seed` (image `image` of its prompt): the same arguments, the same scene."""
    metadata = split_prompt(split, seed, index, include_novel)
    novel_allowed = include_novel if split == "train" else split == "novel"
    return scene_for(metadata, rendering_rng(split, seed, index, image), size, novel_allowed)
