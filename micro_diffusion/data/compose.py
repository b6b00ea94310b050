"""`micro-diffusion data compose`: write compositional scenes (micro_diffusion.data.scenes) to a folder.

    --layout flat     <id>.png + <id>.txt (caption) per scene: the folder `python -m data_prep.convert DIR --format
                      folder` reads; scenes.jsonl beside them holds each scene's GenEval metadata line and drawn objects
    --layout geneval  N prompts in GenEval's layout (<00000>/metadata.jsonl, <00000>/samples/<0000>.png), K images
                      each: ground truth for `micro-diffusion eval compose`; evaluation_metadata.jsonl (the prompt file
                      `micro-diffusion sample --prompts` takes) and scenes.jsonl beside them

The step is `compose(...)`; the command only parses its arguments.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.geneval import write_prompt, write_prompts_file, write_sample
from micro_diffusion.data.scenes import SPLITS, Scene, split_prompt, split_scene
from micro_diffusion.errors import UsageError, check_counts

LAYOUTS = ("flat", "geneval")  # the project's one --layout vocabulary (sample writes the same two)


def _scene_record(scene: Scene, **where: object) -> str:
    return json.dumps({**where, "metadata": scene.metadata, "objects": [o.to_dict() for o in scene.objects],
                       "background": scene.background}) + "\n"


def _fresh(out: Path) -> None:
    """Refuse a folder that already holds files: nothing written before is overwritten or mixed in."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not an empty folder: choose a new one")
    out.mkdir(parents=True, exist_ok=True)


def iter_split(split: str, seed: int, count: int, size: int, include_novel: bool = False) -> Iterator[Scene]:
    """Scenes 0 .. count-1 of a split (one image of each prompt)."""
    for i in range(count):
        yield split_scene(split, seed, i, size, include_novel=include_novel)


def write_folder(out: str | Path, count: int, seed: int, size: int = 64, split: str = "train",
                 include_novel: bool = False, progress: bool = False) -> Path:
    """Write `count` scenes as <id>.png + <id>.txt and scenes.jsonl into a new folder."""
    out = Path(out)
    _fresh(out)
    width = max(6, len(str(count - 1)))
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as records:
        scenes = iter_split(split, seed, count, size, include_novel)
        for i, scene in enumerate(tqdm(scenes, total=count, desc="compose", disable=not progress)):
            stem = f"{split}_{seed}_{i:0{width}d}"
            Image.fromarray(render_scene(scene)).save(out / f"{stem}.png")
            (out / f"{stem}.txt").write_text(scene.metadata["prompt"] + "\n", encoding="utf-8")
            records.write(_scene_record(scene, file=f"{stem}.png"))
    return out


def write_geneval(out: str | Path, count: int, seed: int, size: int = 64, split: str = "heldout",
                  images_per_prompt: int = 4, include_novel: bool = False, progress: bool = False) -> Path:
    """Write `count` prompts of a split in GenEval's layout, `images_per_prompt` renderings each."""
    out = Path(out)
    _fresh(out)
    lines = [split_prompt(split, seed, i, include_novel) for i in range(count)]
    write_prompts_file(out / "evaluation_metadata.jsonl", lines)
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as records:
        for i, line in enumerate(tqdm(lines, desc="compose", disable=not progress)):
            write_prompt(out, i, line)
            for k in range(images_per_prompt):
                scene = split_scene(split, seed, i, size, image=k, include_novel=include_novel)
                write_sample(out, i, k, render_scene(scene))
                records.write(_scene_record(scene, index=i, image=k))
    return out


def compose(out: str | Path, count: int, seed: int, *, size: int = 64, split: str = "train", layout: str = "flat",
            images_per_prompt: int | None = None, include_novel: bool = False, progress: bool = False) -> Path:
    """Write `count` scenes (layout flat) or prompts with `images_per_prompt` renderings each (layout geneval, 4 when
    None) of a split into a new folder `out`; raises UsageError for bad arguments or a folder that holds files."""
    if layout not in LAYOUTS:
        hint = " (renamed: use flat)" if layout == "folder" else ""
        raise UsageError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}{hint}")
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    check_counts(count=count)
    if include_novel and split != "train":
        raise UsageError(f"--include-novel only applies to --split train (the {split} split is a fixed list)")
    if layout == "flat":
        if images_per_prompt is not None:
            raise UsageError("--images-per-prompt only applies to --layout geneval")
        return write_folder(out, count, seed, size, split, include_novel, progress=progress)
    k = 4 if images_per_prompt is None else images_per_prompt
    check_counts(images_per_prompt=k)
    return write_geneval(out, count, seed, size, split, k, include_novel, progress=progress)
