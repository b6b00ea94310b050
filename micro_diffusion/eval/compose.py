"""GenEval-style scores of a GenEval-layout folder of compositional scenes (`micro-diffusion eval compose DIR`).

Every image is read by the fixed reader (eval.reader) and judged by GenEval's rule (eval.geneval_rules); a
task's accuracy is the share of its images judged correct, the overall score the mean of the task accuracies (GenEval's
summary_scores.py). Beside the scores, the reader's trust on the same prompts, rendered as ground truth at the folder's
image size: `ground_truth` (the renders), `shuffled` (the renders against a random permutation of the prompts),
`chance` (what random pairing gives when the drawn objects themselves are judged, no reader involved) and, given a VAE,
`vae` (the renders encoded and decoded: the ceiling of any model trained on that VAE's latents).
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.geneval import read_layout
from micro_diffusion.data.scenes import TASKS, Scene, check_metadata, scene_for
from micro_diffusion.data.shapes import SceneLabels, geneval_lines
from micro_diffusion.errors import UsageError
from micro_diffusion.eval.geneval_rules import evaluate
from micro_diffusion.eval.reader import Detection, by_class, read_objects
from micro_diffusion.utils.atomic import write_text_atomic
from micro_diffusion.utils.run_folder import SAMPLING_RECORD, SCORES

TRUST_SEED = 0  # the ground-truth renders of a folder's prompts are drawn from (TRUST_SEED, prompt, image)
_CHANCE_IMAGES = 50  # random images each line is paired with for the chance level


def summarise(tags: Sequence[str], correct: Sequence[bool]) -> dict[str, Any]:
    """{"tasks": {tag: {"accuracy", "images"}}, "overall"} of per-image results, tasks in GenEval's order."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in zip(tags, correct, strict=True):
        by_tag[tag].append(bool(ok))
    order = [t for t in TASKS if t in by_tag] + sorted(set(by_tag) - set(TASKS))
    tasks = {t: {"accuracy": float(np.mean(by_tag[t])), "images": len(by_tag[t])} for t in order}
    return {"tasks": tasks, "overall": float(np.mean([v["accuracy"] for v in tasks.values()])) if tasks else 0.0}


def judge(images: Sequence[np.ndarray], metadata: Sequence[dict[str, Any]]) -> list[bool]:
    """GenEval's verdict on each uint8 (H, W, 3) image against its metadata line."""
    return [evaluate(by_class(read_objects(im)), meta)[0] for im, meta in zip(images, metadata, strict=True)]


def geneval_score(images: np.ndarray, labels: Sequence[SceneLabels]) -> dict[str, Any]:
    """GenEval-style tasks and overall of the demo's uint8 (N, H, W, 3) single-shape images against their captions'
    labels (data.shapes.geneval_lines: single_object and colors; white shapes are left out)."""
    lines = [geneval_lines(lab) for lab in labels]
    pairs = [(im, line) for im, covered in zip(images, lines, strict=True) for line in covered]
    if not pairs:
        raise ValueError("no demo caption maps to a GenEval task (every shape is white?)")
    correct = judge([p[0] for p in pairs], [p[1] for p in pairs])
    scored = sum(bool(covered) for covered in lines)
    return {**summarise([p[1]["tag"] for p in pairs], correct), "images": scored, "left_out": len(labels) - scored}


def truth_objects(scene: Scene) -> dict[str, list[Detection]]:
    """A scene's drawn objects as detections (largest first), for judging without the reader."""
    dets = [Detection(o.shape, o.colour, o.box, (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])) for o in scene.objects]
    return by_class(dets)


def ground_truth(metadata: Sequence[dict[str, Any]], size: int, seed: int = TRUST_SEED) -> list[Scene]:
    """A ground-truth scene for each metadata line (line k drawn from (seed, k)), any colour-shape pair allowed."""
    return [scene_for(m, np.random.default_rng([seed, k, 7]), size, include_novel=True) for k, m in enumerate(metadata)]


@torch.no_grad()
def through_vae(images: np.ndarray, vae: Any, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) images encoded and decoded by a VAE (encoders.load_vae interface), as uint8 again."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        y = vae.decode(vae.encode(x)).float().cpu()  # (B, 3, H, W) in [-1, 1]
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def chance(metadata: Sequence[dict[str, Any]], scenes: Sequence[Scene], seed: int = TRUST_SEED) -> dict[str, Any]:
    """Accuracy of random prompt/image pairs judged on the drawn objects: each line against up to 50 scenes."""
    rng = np.random.default_rng([seed, 1])
    objects = [truth_objects(s) for s in scenes]
    tags, correct = [], []
    for meta in metadata:
        for j in rng.choice(len(scenes), size=min(_CHANCE_IMAGES, len(scenes)), replace=False):
            tags.append(meta["tag"])
            correct.append(evaluate(objects[j], meta)[0])
    return summarise(tags, correct)


def reader_trust(metadata: Sequence[dict[str, Any]], size: int, vae: Any | None = None,
                 seed: int = TRUST_SEED) -> dict[str, Any]:
    """The reader's scores on ground-truth renders of these lines: ground_truth, shuffled, chance and (given) vae."""
    scenes = ground_truth(metadata, size, seed)
    images = np.stack([render_scene(s) for s in scenes])
    tags = [m["tag"] for m in metadata]
    reads = [by_class(read_objects(im)) for im in tqdm(images, desc="reader trust", mininterval=2)]
    order = np.random.default_rng([seed, 2]).permutation(len(metadata))
    trust = {"size": size, "images": len(metadata), "seed": seed,
             "ground_truth": summarise(tags, [evaluate(r, m)[0] for r, m in zip(reads, metadata, strict=True)]),
             "shuffled": summarise(tags, [evaluate(reads[j], m)[0] for j, m in zip(order, metadata, strict=True)]),
             "chance": chance(metadata, scenes, seed)}
    if vae is not None:
        trust["vae"] = summarise(tags, judge(through_vae(images, vae), metadata))
    return trust


def score_folder(folder: str | Path, vae: Any | None = None, trust: bool = True) -> dict[str, Any]:
    """Scores of a GenEval-layout folder in the scores.json schema (see docs/interfaces.md)."""
    prompts = read_layout(folder)
    records, tags, correct, lines, size = [], [], [], [], None
    for p in tqdm(prompts, desc="eval compose", mininterval=2):
        check_metadata(p.metadata, f"{folder}/{p.index:05d}/metadata.jsonl")
        images = []
        for path in p.images:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
                size = size or min(im.size)
        verdicts = judge(images, [p.metadata] * len(images))
        records.append({"index": p.index, "tag": p.metadata["tag"], "prompt": p.metadata["prompt"],
                        "correct": verdicts})
        tags += [p.metadata["tag"]] * len(verdicts)
        correct += verdicts
        lines += [p.metadata] * len(verdicts)
    if not correct:
        raise UsageError(f"{folder}: no images under <00000>/samples/ (expected <0000>.png files)")
    result = {**summarise(tags, correct), "images": len(correct), "prompts": records}
    if trust:
        result["reader"] = reader_trust(lines, size, vae)
    return result


def write_scores(folder: str | Path, out: str | Path | None = None, vae: Any | None = None) -> tuple[Path, dict]:
    """Score a folder and write scores.json (default FOLDER/scores.json); returns the path and the scores."""
    scores = score_folder(folder, vae)
    path = Path(out) if out else Path(folder) / SCORES
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(scores, indent=1) + "\n")
    return path, scores


def compose_scores(folder: str | Path, out: str | Path | None = None, vae: str | None = None) -> tuple[Path, dict]:
    """`eval compose`: score a GenEval-layout folder and write scores.json; the reader's ceiling through `vae` (an
    encoders.load_vae spec; default: the sampling model's, named in FOLDER/sampling.json, if any)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder (expected a GenEval layout: <00000>/metadata.jsonl, "
                         "<00000>/samples/<0000>.png)")
    if vae is None and (folder / SAMPLING_RECORD).is_file():  # samples of a model: its VAE's ceiling
        vae = json.loads((folder / SAMPLING_RECORD).read_text()).get("vae")
    autoencoder = None
    if vae:
        from micro_diffusion.encoders import load_vae  # diffusers: only when a VAE is scored

        autoencoder = load_vae(vae, device="cpu")
    return write_scores(folder, out, autoencoder)
