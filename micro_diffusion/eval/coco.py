"""COCO-2014 zero-shot protocol: a fixed caption draw, sharded resumable generation, reference images, metrics."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from ..errors import MicroDiffusionError, UsageError, check_counts
from ..exported import is_export
from ..utils.atomic import write_text_atomic
from ..utils.devices import torch_device
from ..utils.folder_lock import hold
from ..utils.images import save_atomic
from ..utils.run_folder import EVAL_METRICS
from .clip_score import clip_score
from .fid import fid_kid
from .generate import Sampling, TextToImage, check_out_folder, check_request, export_config, settings_for

DRAW_SEED = 2014  # the draw is part of the protocol: changing it changes which captions every run is scored on
Render = Callable[[list[str], list[int]], list[Image.Image]]


def draw_captions(annotations: str | Path, num: int = 30000, seed: int = DRAW_SEED) -> list[dict]:
    """A seeded draw of `num` distinct images with one caption each: [{index, image_id, file_name, caption}]."""
    path = Path(annotations)
    if not path.is_file():
        raise UsageError(f"COCO annotations {path} do not exist (captions_val2014.json)")
    data = json.loads(path.read_text())
    for key in ("images", "annotations"):
        if key not in data:
            raise UsageError(f"{path} has no '{key}' list: not a COCO captions file")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    captions: dict[int, list[tuple[int, str]]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append((ann["id"], ann["caption"].strip()))
    ids = sorted(i for i in captions if i in files)  # sorted: the draw never depends on the json's order
    if num > len(ids):
        raise UsageError(f"{path} has {len(ids)} captioned images, fewer than the {num} to draw")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=num, replace=False)
    out = []
    for index, k in enumerate(chosen):
        image_id = ids[int(k)]
        caps = sorted(captions[image_id])  # by annotation id
        caption = caps[int(rng.integers(len(caps)))][1]
        out.append({"index": index, "image_id": image_id, "file_name": files[image_id], "caption": caption})
    return out


def rank_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's RANK / WORLD_SIZE (torchrun, composer -n); (0, 1) when unset."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def image_name(index: int) -> str:
    """File name of the image for caption `index` of the draw."""
    return f"{index:05d}.png"


def generate_missing(draw: list[dict], out_dir: str | Path, render: Render, rank: int = 0, world: int = 1,
                     batch_size: int = 16) -> list[int]:
    """Render this rank's share (index % world == rank) of the draw, skipping images already on disk."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [d for d in draw[rank::world] if not (out / image_name(d["index"])).exists()]
    done = []
    for i in tqdm(range(0, len(todo), batch_size), desc=f"generate rank {rank}/{world}", disable=not todo):
        batch = todo[i:i + batch_size]
        images = render([d["caption"] for d in batch], [d["index"] for d in batch])
        for d, im in zip(batch, images, strict=True):
            save_atomic(im, out / image_name(d["index"]))
            done.append(d["index"])
    return done


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Largest centred square, resized to size x size (bicubic), RGB."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def prepare_reference(draw: list[dict], images_dir: str | Path, out_dir: str | Path, size: int, rank: int = 0,
                      world: int = 1) -> int:
    """Centre-cropped, resized real images of the draw (this rank's share), named like the generated ones."""
    src, out = Path(images_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = 0
    for d in tqdm(draw[rank::world], desc="reference images", leave=False):
        dst = out / image_name(d["index"])
        if dst.exists():
            continue
        path = src / d["file_name"]
        if not path.is_file():
            raise UsageError(f"COCO image {path} (image_id {d['image_id']}) does not exist")
        save_atomic(center_crop_resize(Image.open(path), size), dst)
        made += 1
    return made


def missing_images(draw: list[dict], folder: str | Path) -> list[int]:
    """Indices of the draw without an image in the folder."""
    return [d["index"] for d in draw if not (Path(folder) / image_name(d["index"])).exists()]


def _barrier(world: int) -> None:
    """Wait for every rank's share of images (a real process-group barrier; never a sleep)."""
    if world == 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dist.barrier()


def evaluate_coco(model: str | Path, annotations: str | Path, images_dir: str | Path, out_dir: str | Path,
                  settings: Sampling = None, seed: int = 0, use_ema: bool | None = None, num: int = 30000,
                  draw_seed: int = DRAW_SEED, resolution: int | None = None, clip_model: str = "ViT-L-14",
                  clip_pretrained: str | None = "openai", batch_size: int = 16,
                  device: str | None = None) -> dict | None:
    """The full protocol on an export; every rank generates its share, rank 0 writes metrics.json (other ranks return
    None). settings: see eval.generate.settings_for (None: the export's)."""
    rank, world = rank_world()
    device = str(torch_device(device))
    out = Path(out_dir)
    draw = draw_captions(annotations, num, draw_seed)
    gen_dir, ref_dir = out / "generated", out / f"reference_{num}_{draw_seed}"
    render = TextToImage(model, settings_for(export_config(model), settings), seed, use_ema, device)
    size = resolution or render.resolution
    record = render.record()
    if rank == 0:
        write_text_atomic(out / "captions.jsonl", "".join(json.dumps(d) + "\n" for d in draw))
    prepare_reference(draw, images_dir, ref_dir, size, rank, world)
    generate_missing(draw, gen_dir, render, rank, world, batch_size)
    del render
    _barrier(world)
    if rank != 0:
        return None
    for folder in (gen_dir, ref_dir):
        gone = missing_images(draw, folder)
        if gone:
            raise MicroDiffusionError(f"{folder} lacks {len(gone)} images of the draw (first: {image_name(gone[0])})")
    names = [gen_dir / image_name(d["index"]) for d in draw]
    metrics = fid_kid(gen_dir, ref_dir, device=device)
    clip = clip_score(names, [d["caption"] for d in draw], clip_model, clip_pretrained, device)
    result = {"fid": metrics["fid"], "kid_mean": metrics["kid_mean"], "kid_std": metrics["kid_std"],
              "clip_score": clip["clip_score"], "clip_score_std": clip["clip_score_std"],
              "settings": {"model": str(model), "annotations": str(annotations), "num_captions": num,
                           "draw_seed": draw_seed, "resolution": size, "world_size": world,
                           **record, "fid": metrics["settings"], "clip": clip["settings"]}}
    write_text_atomic(out / EVAL_METRICS, json.dumps(result, indent=2))
    return result


def coco(model: str | Path, out: str | Path, annotations: str | Path, images: str | Path, settings: Sampling = None,
         seed: int = 0, use_ema: bool | None = None, num: int = 30000, draw_seed: int = DRAW_SEED,
         resolution: int | None = None, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
         batch_size: int = 16, device: str | None = None, dry_run: bool = False) -> dict | None:
    """The COCO zero-shot evaluation of an export, a run folder or a checkpoint (exported first, to OUT/model).

    dry_run: only the resolved plan (nothing written). Otherwise metrics.json's content on rank 0, None elsewhere.
    """
    model, out = Path(model), Path(out)
    check_counts(num=num, batch_size=batch_size, resolution=resolution)  # before anything loads or is written
    if not dry_run:  # a dry run lists the missing inputs instead
        if not model.exists():
            raise UsageError(f"{model} does not exist (an export, a run folder or a checkpoint)")
        check_out_folder(out)
        if is_export(model):
            check_request(model, settings, use_ema)
    if dry_run:
        exported = is_export(model)
        resolved = settings_for(export_config(model) if exported else {}, settings).to_dict()
        return {"model": str(model), "annotations": str(annotations), "images": str(images), "out": str(out),
                "num": num, "draw_seed": draw_seed, "clip_model": clip_model, "clip_pretrained": clip_pretrained,
                "sampling": resolved, "seed": seed, "sampling_from": "the export's record" if exported else
                "the package defaults: a run is exported first, and its recipe's samples: settings apply",
                "inputs_present": {k: Path(v).exists() for k, v in
                                   [("model", model), ("annotations", annotations), ("images", images)]}}
    with hold(out, "eval coco"):  # one writer per output folder (global rank 0 holds it for the job)
        if not is_export(model):  # a run folder or checkpoint: export it first, beside the results
            from ..training.export import export_run  # imports Composer (seconds): only a run folder needs it

            if rank_world()[1] > 1:  # ranks exporting at once would race on one folder
                raise UsageError(f"{model} is not an exported model: with several processes, run "
                                 f"`micro-diffusion export {model} --out DIR` first and pass DIR")
            model = export_run(model, out / "model")
        return evaluate_coco(model, annotations, images, out, settings, seed, use_ema, num, draw_seed, resolution,
                             clip_model, clip_pretrained, batch_size, device)
