"""The CPU demo: the whole pipeline end to end on the embedded shapes dataset, everything under one folder.

    micro-diffusion demo [--root runs/demo] [--fresh] [--quick]        (what `make demo` runs)

Steps: generate captioned shape scenes -> convert to MDS -> precompute latents (the committed demo VAE) and caption
embeddings (the packaged MiniLM) -> train demo_masked (75% deferred masking) then demo_finetune (unmasked) -> export ->
sample a grid for held-out captions with guidance -> evaluate (caption match read back by a fixed reader, its chance
level and its score on real images; FID against held-out real images) -> distil the finetuned model into a consistency
student (demo_distill) and score it at 1, 2 and 4 steps beside the teacher -> train a tiny Fluid (demo_fluid) on the
same latents, export it and score it the same way -> cost dashboard -> summary.json.
A finished step leaves a marker and is skipped on the next run, unless --fresh starts over.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from data_prep.convert import convert
from data_prep.precompute import precompute
from micro_diffusion.cost.report import write_report
from micro_diffusion.data.shapes import HELDOUT_SEED, IMAGE_SIZE, TRAIN_SEED, parse_caption, write_folder
from micro_diffusion.diffusion.sampling import SamplingSettings
from micro_diffusion.errors import UsageError
from micro_diffusion.eval.card import write_card
from micro_diffusion.eval.coco import generate_missing, image_name
from micro_diffusion.eval.compose import geneval_score
from micro_diffusion.eval.fid import fid_kid
from micro_diffusion.eval.generate import TextToImage
from micro_diffusion.eval.reader import caption_match, shuffled_match
from micro_diffusion.training import Run, train
from micro_diffusion.training.export import export_run
from micro_diffusion.utils.atomic import write_text_atomic
from micro_diffusion.utils.images import grid
from micro_diffusion.utils.run_folder import (
    EVAL,
    EVAL_METRICS,
    REPORT,
    SAMPLES,
    TRAIN_LOSS,
    metric_series,
    metrics_file,
)

from . import DEFAULT_ROOT, demo_vae_path, step_marker
from .distilled import score_student
from .fluid import score_fluid

MARKER = ".micro_diffusion_demo"  # identifies a folder this demo made: --fresh deletes nothing else
CAPTION_LEN = 16  # MiniLM tokens kept: shape captions are about 10 tokens, so 77 would be mostly padding
LOSS_WINDOW = 10  # loss_first / loss_last average this many logged batches


@dataclass
class DemoConfig:
    """Sizes and settings of one demo run (defaults: the full demo; tests shrink them)."""

    root: Path = DEFAULT_ROOT
    train_images: int = 4000
    heldout_images: int = 256  # real images for FID and the reader's trust check; captions for generation
    grid_images: int = 24
    sample_steps: int = 20
    guidance: float = 4.0
    sampler: str = "heun"
    seed: int = 0
    masked_recipe: str = "recipes/demo_masked.yaml"
    finetune_recipe: str = "recipes/demo_finetune.yaml"
    distill_recipe: str = "recipes/demo_distill.yaml"  # the finetuned model distilled into a 1-4 step student
    fluid_recipe: str = "recipes/demo_fluid.yaml"  # the second model family on the same latents
    train_overrides: dict[str, Any] = field(default_factory=dict)  # {dotted key: value} applied to every stage
    fluid_overrides: dict[str, Any] = field(default_factory=dict)  # and to the Fluid stage (its sampling settings)
    fresh: bool = False

    @classmethod
    def quick(cls, root: Path, fresh: bool = False) -> DemoConfig:
        """Every step at a much smaller size (seconds of training): checks the pipeline, not the results."""
        return cls(root=root, train_images=64, heldout_images=12, grid_images=8, sample_steps=2, fresh=fresh,
                   fluid_overrides={"samples.steps": 2, "samples.head_steps": 5},
                   train_overrides={"train.max_duration": "3ba", "train.global_batch": 16,
                                    "train.device_microbatch": 16, "train.log_interval": "1ba",
                                    "checkpoint.save_interval": "3ba"})


def _step(root: Path, name: str, fn: Callable[[], Any], log: list[str]) -> tuple[Any, float]:
    """Run a step once: its result and duration are saved as a done marker and reused by the next run."""
    done = step_marker(root, name)
    if done.is_file():
        saved = json.loads(done.read_text())
        log.append(f"{name}: reused")
        print(f"[demo] {name}: already done in {saved['seconds']:.1f} s, reusing ({done})", flush=True)
        return saved["result"], saved["seconds"]
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(done, json.dumps({"seconds": seconds, "result": result}, indent=2) + "\n")
    log.append(f"{name}: {seconds:.1f} s")
    print(f"[demo] {name}: done in {seconds:.1f} s", flush=True)
    return result, seconds


def make_data(cfg: DemoConfig) -> dict:
    """Scenes as a captioned folder, converted to MDS, then encoded to latents and caption embeddings."""
    data = cfg.root / "data"
    write_folder(data / "images", cfg.train_images, seed=TRAIN_SEED)
    write_folder(data / "heldout", cfg.heldout_images, seed=HELDOUT_SEED)
    convert(data / "images", data / "mds", "folder", workers=0, min_size=IMAGE_SIZE)  # scenes are small on purpose
    precompute(data / "mds", data / "latents", [IMAGE_SIZE], vae=str(demo_vae_path()), text_encoder="minilm",
               caption_len=CAPTION_LEN, batch_size=256)
    return {"images": cfg.train_images, "heldout": cfg.heldout_images, "latents": str(data / "latents")}


def train_stage(cfg: DemoConfig, recipe: str, extra: dict[str, Any] | None = None) -> dict:
    """Train one demo stage with training.train and read back its loss and cost."""
    overrides = {"runs_root": str(cfg.root), "data.root": str(cfg.root / "data"), **cfg.train_overrides,
                 **(extra or {})}
    return stage_summary(train(recipe, overrides))


def stage_summary(run: Run) -> dict:
    """Name, steps, mask ratio, first and last training loss, device-hours and dollars of a finished run."""
    losses = [loss for _, loss in metric_series(run.run_dir, TRAIN_LOSS)]
    if not losses:
        raise RuntimeError(f"{metrics_file(run.run_dir)} has no training loss")
    if run.stage_totals is None:
        raise RuntimeError(f"{run.run_dir} has no cost ledger")
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))  # EDM losses vary with the drawn sigma: average a few
    mask = run.recipe["diffusion"]["mask_ratio"]  # None: Fluid draws one per batch
    return {"name": run.stage, "steps": len(losses), "mask_ratio": None if mask is None else float(mask),
            "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
            "loss_window": window, "device_hours": run.stage_totals.device_hours, "usd": run.stage_totals.usd,
            "run_dir": str(run.run_dir)}


def heldout_captions(cfg: DemoConfig) -> tuple[list[Path], list[str]]:
    """The held-out real images and their captions, in index order."""
    images = sorted((cfg.root / "data" / "heldout").glob("*.png"))
    return images, [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]


def generate(cfg: DemoConfig, model_dir: Path) -> dict:
    """Images for every held-out caption (evaluation) and a grid of the first few (the README's picture)."""
    settings = _teacher_settings(cfg)
    _, captions = heldout_captions(cfg)
    out = cfg.root / "eval" / "generated"
    render = TextToImage(model_dir, settings, cfg.seed)
    generate_missing([{"index": i, "caption": c} for i, c in enumerate(captions)], out, render, batch_size=64)
    tiles = [Image.open(out / image_name(i)).convert("RGB").resize((96, 96), Image.Resampling.NEAREST)
             for i in range(min(cfg.grid_images, len(captions)))]
    samples = cfg.root / SAMPLES
    samples.mkdir(parents=True, exist_ok=True)
    grid(tiles, cols=8).save(samples / "grid.png")
    (samples / "grid_captions.txt").write_text("\n".join(captions[: len(tiles)]) + "\n", encoding="utf-8")
    return {"generated": str(out), "grid": f"{SAMPLES}/grid.png", "settings": {**settings.to_dict(), "seed": cfg.seed},
            "record": render.record()}


def write_eval_record(cfg: DemoConfig, model_dir: Path, metrics: dict, record: dict | None) -> Path:
    """The teacher's scores as a metrics.json beside its export, tied to its weights by their xxh64, then the export's
    model card written again with them (eval.card). A generate step of an older demo run kept no record: no scores."""
    if record is not None:
        dataset = {"dataset_type": "micro-diffusion-demo-shapes", "dataset_split": "heldout",
                   "dataset_name": f"demo held-out scenes ({metrics['fid']['images']} captions, 32 px)"}
        scores = {"fid": metrics["fid"]["value"], "geneval": metrics["geneval"]["overall"],
                  "caption_match": metrics["caption_match"]["value"], "settings": {**dataset, **record}}
        write_text_atomic(cfg.root / "eval" / EVAL_METRICS, json.dumps(scores, indent=2) + "\n")
    return write_card(model_dir)


def evaluate(cfg: DemoConfig, generated: Path) -> dict:
    """Caption match of generated images (with chance and the reader's score on real images) and FID."""
    real_paths, captions = heldout_captions(cfg)
    labels = [parse_caption(c) for c in captions]
    gen_paths = sorted(generated.glob("*.png"))
    if len(gen_paths) != len(labels):
        raise RuntimeError(f"{generated} holds {len(gen_paths)} images for {len(labels)} held-out captions")
    real = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in real_paths])
    fake = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in gen_paths])
    ref = cfg.root / "eval" / "real"  # PNGs alone: the held-out folder also holds caption files
    ref.mkdir(parents=True, exist_ok=True)
    for p in real_paths:
        shutil.copyfile(p, ref / p.name)
    fid = fid_kid(generated, ref, kid_subsets=10)
    return {
        "fid": {"value": fid["fid"], "images": len(gen_paths), "reference_images": len(real_paths),
                "kid_mean": fid["kid_mean"], "settings": fid["settings"]},
        "caption_match": {"value": caption_match(fake, labels), "chance": shuffled_match(fake, labels, seed=cfg.seed),
                          "images": len(gen_paths)},
        "caption_match_real": {"value": caption_match(real, labels), "images": len(real_paths)},
        "geneval": geneval_score(fake, labels),  # the reader's trust: the real images, and shuffled pairs
        "geneval_real": geneval_score(real, labels),
        "geneval_shuffled": geneval_score(real, [labels[i] for i in
                                                 np.random.default_rng(cfg.seed).permutation(len(labels))]),
    }


def distill_scores(cfg: DemoConfig, teacher_dir: Path, student_dir: Path, teacher_eval: dict,
                   run_dirs: list[str]) -> dict:
    """The student at 1, 2 and 4 steps beside the teacher, on the held-out captions the teacher was scored on."""
    _, captions = heldout_captions(cfg)
    teacher = TextToImage(teacher_dir, _teacher_settings(cfg), cfg.seed)
    return score_student(cfg.root, captions, teacher, student_dir, cfg.seed, teacher_eval,
                         lambda folder: evaluate(cfg, folder), run_dirs[:-1], run_dirs[-1])


def _teacher_settings(cfg: DemoConfig) -> SamplingSettings:
    return SamplingSettings(steps=cfg.sample_steps, guidance=cfg.guidance, sampler=cfg.sampler)


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or finish) the demo and write summary.json; returns the summary."""
    start = time.perf_counter()
    root = cfg.root
    if cfg.fresh and root.exists():
        if not (root / MARKER).is_file():
            raise UsageError(f"{root} exists but was not made by the demo (no {MARKER}); not deleting it: give "
                             "another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by micro-diffusion demo\n")
    log: list[str] = []
    seconds: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        result, seconds[name] = _step(root, name, fn, log)
        return result

    data = step("data", lambda: make_data(cfg))
    stages = [step(name, lambda r=recipe: train_stage(cfg, r))
              for name, recipe in (("train_masked", cfg.masked_recipe), ("train_finetune", cfg.finetune_recipe))]

    def export() -> dict:
        return {"model": str(export_run(stages[-1]["run_dir"], root / "model"))}

    model = step("export", export)
    samples = step("sample", lambda: generate(cfg, Path(model["model"])))
    metrics = step("evaluate", lambda: evaluate(cfg, Path(samples["generated"])))
    write_text_atomic(Path(stages[-1]["run_dir"]) / EVAL, json.dumps(
        {"fid": metrics["fid"]["value"], "caption_match": metrics["caption_match"]["value"]}) + "\n")
    write_eval_record(cfg, Path(model["model"]), metrics, samples.get("record"))
    # the student learns the teacher as the demo samples it: guided at the demo's scale
    stages.append(step("train_distill", lambda: train_stage(cfg, cfg.distill_recipe,
                                                            {"distill.guidance": cfg.guidance})))
    student = step("export_student", lambda: {"model": str(export_run(stages[-1]["run_dir"], root / "student"))})
    distilled = step("distilled", lambda: distill_scores(cfg, Path(model["model"]), Path(student["model"]), metrics,
                                                         [s["run_dir"] for s in stages]))

    stages.append(step("train_fluid", lambda: train_stage(cfg, cfg.fluid_recipe, cfg.fluid_overrides)))
    fluid_model = step("export_fluid", lambda: {"model": str(export_run(stages[-1]["run_dir"], root / "fluid"))})
    fluid = step("fluid", lambda: score_fluid(root, heldout_captions(cfg)[1], Path(fluid_model["model"]), cfg.seed,
                                              lambda folder: evaluate(cfg, folder), stages[-1]["run_dir"]))

    report = write_report([s["run_dir"] for s in stages], out=root / REPORT)
    reused = {line.split(":")[0] for line in log if line.endswith("reused")}
    this_run = time.perf_counter() - start
    wall = this_run + sum(sec for name, sec in seconds.items() if name in reused)  # reused: as measured when run
    summary = {"wall_clock_s": wall, "this_run_s": this_run, "step_seconds": seconds, "steps_log": log,
               "data": data, "stages": stages, "samples": samples["grid"], "model": model["model"],
               "eval": metrics, "distilled": distilled, "student": student["model"], "fluid": fluid,
               "report": str(report.relative_to(root)),
               "config": {k: str(v) for k, v in asdict(cfg).items()}}
    write_text_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, root)
    return summary


def _print_summary(summary: dict, root: Path) -> None:
    ev = summary["eval"]
    print("\n[demo] finished in {:.0f} s".format(summary["wall_clock_s"]))
    for s in summary["stages"]:
        mask = "per batch" if s["mask_ratio"] is None else s["mask_ratio"]
        print(f"[demo] {s['name']}: {s['steps']} steps, mask {mask}, loss {s['loss_first']:.3f} -> "
              f"{s['loss_last']:.3f}, {s['device_hours']:.4f} device-hours, ${s['usd']:.4f}")
    print(f"[demo] caption match {ev['caption_match']['value']:.3f} (chance {ev['caption_match']['chance']:.3f}; "
          f"reader on real images {ev['caption_match_real']['value']:.3f}); "
          f"FID {ev['fid']['value']:.1f} over {ev['fid']['images']} images")
    g = ev["geneval"]
    tasks = ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in g["tasks"].items())
    print(f"[demo] GenEval-style overall {g['overall']:.3f} ({tasks}; real images "
          f"{ev['geneval_real']['overall']:.3f}, shuffled pairs {ev['geneval_shuffled']['overall']:.3f})")
    dis = summary["distilled"]
    for k, entry in dis["steps"].items():
        print(f"[demo] student, {k} step(s): caption match {entry['caption_match']:.3f}, GenEval-style "
              f"{entry['geneval']:.3f}, FID {entry['fid']:.1f}, "
              f"{entry['images_per_s'] / dis['teacher']['images_per_s']:.0f}x the teacher's images/s")
    print(f"[demo] distillation FLOPs: {dis['distill_flops'] / dis['teacher_train_flops']:.0%} of the teacher's "
          "training")
    f = summary["fluid"]
    print(f"[demo] Fluid: caption match {f['caption_match']:.3f} (chance {f['caption_match_chance']:.3f}), "
          f"GenEval-style {f['geneval']:.3f}, FID {f['fid']:.1f}, {f['images_per_s']:.1f} images/s, "
          f"{f['train_flops']:.3g} training FLOPs")
    print(f"[demo] sample grid  {root / summary['samples']}")
    print(f"[demo] dashboard    {root / summary['report']}")
    print(f"[demo] model        {summary['model']}")
    print(f"[demo] summary      {root / 'summary.json'}")
