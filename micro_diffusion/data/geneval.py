"""GenEval's prompt file and image layout (github djghosh13/geneval), shared by scene writing, sampling and scoring.

    evaluation_metadata.jsonl      one metadata line per prompt: {"tag", "include", ["exclude"], "prompt"}
    OUT/<00000>/metadata.jsonl     line N of that file (one JSON object)
    OUT/<00000>/samples/<0000>.png the prompt's images
GenEval's own evaluate_images.py reads this layout unchanged.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from micro_diffusion.utils.atomic import write_text_atomic
from micro_diffusion.utils.images import save_atomic
from micro_diffusion.utils.jsonl import read_jsonl

_PROMPT_DIR = re.compile(r"^\d+$")
_SAMPLE = re.compile(r"^\d+\.png$")


@dataclass(frozen=True)
class LayoutPrompt:
    """One prompt folder of a GenEval layout: its index, metadata line and image files in order."""

    index: int
    metadata: dict[str, Any]
    images: tuple[Path, ...]


def check_line(line: Any, where: str) -> dict[str, Any]:
    """A GenEval metadata line (a dict with a str prompt, a str tag and an include list), else an error naming where."""
    if not isinstance(line, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(line).__name__}")
    for key, kind in (("prompt", str), ("tag", str), ("include", list)):
        if not isinstance(line.get(key), kind):
            raise ValueError(f"{where}: key {key!r} missing or not a {kind.__name__} (GenEval metadata needs "
                             "tag, include and prompt)")
    return line


def read_prompts_file(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a GenEval evaluation_metadata.jsonl, each checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [check_line(line, f"{path}: line {i + 1}") for i, line in enumerate(read_jsonl(path))]
    if not lines:
        raise ValueError(f"prompts file {path} holds no metadata lines")
    return lines


def write_prompts_file(path: str | Path, lines: list[dict[str, Any]]) -> Path:
    """Write metadata lines as a GenEval evaluation_metadata.jsonl."""
    path = Path(path)
    write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def prompt_dir(out: str | Path, index: int) -> Path:
    """OUT/<00000>: the folder of prompt `index`."""
    return Path(out) / f"{index:05d}"


def sample_path(out: str | Path, index: int, image: int) -> Path:
    """OUT/<00000>/samples/<0000>.png: image `image` of prompt `index`."""
    return prompt_dir(out, index) / "samples" / f"{image:04d}.png"


def write_prompt(out: str | Path, index: int, metadata: dict[str, Any]) -> Path:
    """Create OUT/<index>/samples and write its metadata.jsonl; a folder holding another prompt is an error."""
    folder = prompt_dir(out, index)
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        old = json.loads(meta.read_text(encoding="utf-8"))
        if old != metadata:
            raise ValueError(f"{meta} holds another prompt ({old.get('prompt')!r}, not {metadata['prompt']!r}): "
                             "write to a fresh --out folder")
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta, json.dumps(metadata) + "\n", encoding="utf-8")
    return folder


def write_sample(out: str | Path, index: int, image: int, pixels: np.ndarray | Image.Image) -> Path:
    """Write one image (uint8 (H, W, 3) or PIL) of a prompt, atomically."""
    path = sample_path(out, index, image)
    save_atomic(pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels), path)
    return path


def read_layout(folder: str | Path) -> list[LayoutPrompt]:
    """Every numbered prompt folder of a GenEval layout, in index order, with its images (as GenEval lists them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a GenEval layout: <00000>/metadata.jsonl, "
                                "<00000>/samples/<0000>.png)")
    prompts = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir() and _PROMPT_DIR.match(p.name)),
                      key=lambda p: int(p.name)):
        meta = sub / "metadata.jsonl"
        if not meta.is_file():
            raise ValueError(f"{sub}: no metadata.jsonl (expected one GenEval metadata line)")
        try:
            line = json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}: not one JSON object ({err.msg})") from err
        samples = sub / "samples"
        images = sorted(p for p in samples.iterdir() if _SAMPLE.match(p.name)) if samples.is_dir() else []
        prompts.append(LayoutPrompt(int(sub.name), check_line(line, str(meta)), tuple(images)))
    if not prompts:
        raise ValueError(f"{folder} holds no GenEval prompt folders (<00000>/metadata.jsonl)")
    return prompts
