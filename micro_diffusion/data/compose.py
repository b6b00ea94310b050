"""`micro-diffusion data compose`: write compositional scenes (micro_diffusion.data.scenes) to a folder.

    --layout folder   <id>.png + <id>.txt (caption) per scene: the folder `python -m data_prep.convert --format folder`
                      reads; scenes.jsonl beside them holds each scene's GenEval metadata line and drawn objects
    --layout geneval  N prompts in GenEval's layout (<00000>/metadata.jsonl, <00000>/samples/<0000>.png), K images
                      each: ground truth for `micro-diffusion eval compose`; evaluation_metadata.jsonl (the prompt file
                      `micro-diffusion sample --prompts-file` takes) and scenes.jsonl beside them
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.geneval import write_prompt, write_prompts_file, write_sample
from micro_diffusion.data.scenes import NOVEL_PAIRS, SPLITS, Scene, split_prompt, split_scene


def _scene_record(scene: Scene, **where: object) -> str:
    return json.dumps({**where, "metadata": scene.metadata, "objects": [o.to_dict() for o in scene.objects],
                       "background": scene.background}) + "\n"


def _fresh(out: Path) -> None:
    """Refuse a folder that already holds files: nothing written before is overwritten or mixed in."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty folder: choose a new one")
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


def run_compose(args: argparse.Namespace) -> int:
    """The `data compose` command."""
    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    if args.include_novel and args.split != "train":
        raise ValueError(f"--include-novel only applies to --split train (the {args.split} split is a fixed list)")
    if args.layout == "geneval":
        k = 4 if args.images_per_prompt is None else args.images_per_prompt
        if k < 1:
            raise ValueError(f"--images-per-prompt must be at least 1, got {k}")
        write_geneval(args.out, args.count, args.seed, args.size, args.split, k, args.include_novel, progress=True)
        print(f"wrote {args.count} {args.split} prompts x {k} images in GenEval's layout "
              f"to {args.out}")
    else:
        if args.images_per_prompt is not None:
            raise ValueError("--images-per-prompt only applies to --layout geneval")
        write_folder(args.out, args.count, args.seed, args.size, args.split, args.include_novel, progress=True)
        print(f"wrote {args.count} {args.split} scenes ({args.size} px) to {args.out}")
    return 0


def register_compose(sub: argparse._SubParsersAction) -> None:
    """Add `data compose` to the data command group."""
    pairs = ", ".join(f"{c} {s}" for c, s in NOVEL_PAIRS)
    p = sub.add_parser("compose", help="captioned compositional scenes with GenEval-format prompts",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    p.add_argument("--count", type=int, required=True, help="scenes (folder layout) or prompts (geneval layout)")
    p.add_argument("--seed", type=int, required=True, help="train: prompts and drawings; heldout/novel: drawings")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help=f"train: all six tasks at random; heldout: the fixed evaluation list; novel: prompts naming "
                        f"the colour-shape pairs train leaves out ({pairs})")
    p.add_argument("--include-novel", action="store_true", help="train: also draw the novel colour-shape pairs")
    p.add_argument("--layout", choices=("folder", "geneval"), default="folder")
    p.add_argument("--images-per-prompt", type=int, default=None, help="geneval layout: renderings a prompt "
                   "(default 4)")
    p.set_defaults(func=run_compose)
