"""Subcommands `export`, `sample`, `push`, `serve` and `eval {fid, coco, sweep, compose}` of the micro-diffusion
console script.

Each handler parses nothing itself: it calls one step function (training.export.export_run, eval.generate.sample,
eval.hub.push, eval.serve.serve, eval.fid.fid, eval.coco.coco, eval.sweep.run_sweep, eval.compose.compose_scores)
with typed arguments and prints what it returned. A project error becomes one line and its exit code through the
console script (docs/exit-codes.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..diffusion.sampling import GUIDANCE_MODES, SAMPLERS
from ..errors import UsageError
from ..utils.argparsing import renamed, subparser
from .generate import load_prompts, sample

EXPORTS = "the export's"  # what a sampling flag left out means: the settings the export recorded


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings given on the command line; the ones left out come from the export."""
    interval = getattr(args, "guidance_interval", None)
    return {"steps": getattr(args, "steps", None), "guidance": getattr(args, "guidance", None),
            "sampler": getattr(args, "sampler", None), "guidance_interval": tuple(interval) if interval else None,
            "temperature": getattr(args, "temperature", None), "head_steps": getattr(args, "head_steps", None),
            "guidance_mode": getattr(args, "guidance_mode", None)}


def _use_ema(args: argparse.Namespace) -> bool | None:
    """--ema: EMA weights (an error when the export has none); --raw: raw weights; neither: EMA when present."""
    return True if args.ema else False if args.raw else None


def _add_settings(p: argparse.ArgumentParser) -> None:
    """--steps, --guidance, --sampler: left out, the export's recorded settings (older exports: the package's)."""
    p.add_argument("--steps", type=int, default=argparse.SUPPRESS,
                   help=f"noise levels; Heun spends 2*steps-1 evaluations, a distilled student 1, 2 or 4; "
                        f"--sampler fluid: transformer passes (default: {EXPORTS})")
    p.add_argument("--guidance", type=float, default=argparse.SUPPRESS,
                   help=f"guidance scale, 1 = none (default: {EXPORTS}; 1 with --sampler consistency)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=argparse.SUPPRESS, help=f"(default: {EXPORTS})")
    p.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default=argparse.SUPPRESS,
                   help=f"cfg, or path_drop: SPRINT's Path-Drop Guidance, the unconditional branch without the sparse "
                        f"middle blocks (SPRINT networks only) (default: {EXPORTS}, else cfg)")
    p.add_argument("--temperature", type=float, default=argparse.SUPPRESS,
                   help=f"--sampler fluid: scales the noise of each head step (default: {EXPORTS}, else 0.975)")
    p.add_argument("--head-steps", type=int, default=argparse.SUPPRESS,
                   help=f"--sampler fluid: the head's reverse steps per token (default: {EXPORTS}, else 100)")


def _add_run(p: argparse.ArgumentParser, batch_size: int = 16) -> None:
    """Seed, weights, device and batch size: how a sampling run runs, not what it samples."""
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                   default=argparse.SUPPRESS, help=f"apply guidance only for sigma in [lo, hi] (default: {EXPORTS})")
    p.add_argument("--seed", type=int, default=0, help="image k uses the seed of (SEED, k), as training grids do")
    _add_loading(p)
    p.add_argument("--batch-size", type=int, default=batch_size)


def _add_loading(p: argparse.ArgumentParser) -> None:
    """--raw / --ema (read by _use_ema) and --device: which weights load, and where."""
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--raw", action="store_true", help="the raw weights, even when the export has EMA weights")
    weights.add_argument("--ema", action="store_true", help="the EMA weights (an error when the export has none)")
    p.add_argument("--device", default=None, help="None picks cuda when available, else cpu")


def _check_export(run: str, out: str, config: str | None) -> None:
    """export's paths, checked before Composer is imported: the run or checkpoint, --config, --out."""
    if not Path(run).exists():
        raise UsageError(f"run folder or checkpoint {run} does not exist: give runs/<stage> or a checkpoint file in it")
    if config is not None and not Path(config).is_file():
        raise UsageError(f"--config {config} does not exist: give the run's config.yaml")
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file: give the export folder to write")


def _export(args: argparse.Namespace) -> int:
    _check_export(args.run, args.out, args.config)
    from ..training.export import export_run  # imports Composer (seconds): only this command needs it

    out = export_run(args.run, args.out, args.config)
    print(f"exported {args.run} -> {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    prompts = [*(args.prompt or []), *(load_prompts(args.prompts) if args.prompts else [])]
    done = sample(args.model, prompts, args.out, _settings(args), args.seed, args.layout, args.images_per_prompt,
                  args.batch_size, _use_ema(args), args.device, args.save_latents)
    if args.layout == "geneval":
        print(f"wrote {done['images']} images ({done['prompts']} prompts x {done['images_per_prompt']}, GenEval's "
              f"layout) to {done['out']}")
    else:
        print(f"wrote {done['images']} images and grid.png to {done['out']}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push  # huggingface_hub's upload machinery: only this command needs it

    url = push(args.export, args.repo_id, args.private, refresh_card=not args.keep_card)
    print(f"pushed {args.export} -> {args.repo_id}: {url}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve  # imports Gradio (seconds): only this command needs it

    serve(args.export, args.host, args.port, args.device, args.dtype, _use_ema(args))
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    from .fid import fid  # torch-fidelity: only this command needs it

    print(json.dumps(fid(args.gen, args.ref, args.out, args.batch_size, args.device), indent=2))
    return 0


def _eval_coco(args: argparse.Namespace) -> int:
    from .coco import coco

    result = coco(args.model, args.out, args.annotations, args.images, _settings(args), args.seed, _use_ema(args),
                  args.num, args.draw_seed, args.resolution, args.clip_model, args.clip_pretrained or None,
                  args.batch_size, args.device, args.dry_run)
    if result is not None:  # other ranks of a multi-process run return None
        print(json.dumps(result, indent=2))
    return 0


def _eval_compose(args: argparse.Namespace) -> int:
    from .compose import compose_scores  # the scorer and its reader: only this command needs them

    path, scores = compose_scores(args.dir, args.out, args.vae)
    rows = {"scores": scores, **{k: v for k, v in scores.get("reader", {}).items() if isinstance(v, dict)}}
    print(f"{'':14s}" + "".join(f"{t:>14s}" for t in scores["tasks"]) + f"{'overall':>10s}")
    for name, part in rows.items():
        print(f"{name:14s}" + "".join(f"{part['tasks'][t]['accuracy']:14.3f}" for t in scores["tasks"])
              + f"{part['overall']:10.3f}")
    print(f"wrote {path}")
    return 0


def _eval_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep  # matplotlib and the FLOP counter: only this command needs them

    interval = getattr(args, "guidance_interval", None)
    result = run_sweep(args.model, args.out, args.presets, args.guidances, num=args.num, annotations=args.annotations,
                       images=args.images, scenes=args.scenes, geneval=args.geneval,
                       images_per_prompt=args.images_per_prompt, seed=args.seed, use_ema=_use_ema(args),
                       device=args.device, batch_size=args.batch_size,
                       guidance_interval=tuple(interval) if interval else None, draw_seed=args.draw_seed)
    print(json.dumps(result["settings"], indent=2))
    for p in result["points"]:
        quality = f"FID {p['fid']:.2f}" + (f", GenEval-style {p['geneval']['overall']:.3f}" if "geneval" in p else "")
        print(f"{p['sampler']:>10s} {p['steps']:3d} steps  guidance {p['guidance']:<4g} {p['flops_per_image']:.3g} "
              f"FLOPs/image  {p['images_per_s']:.2f} img/s  {quality}")
    return 0


def _register_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparser(subparsers, "sample", help="generate images from an exported model")
    p.add_argument("model", help="folder written by micro-diffusion export (or import-reference), or hf://ORG/NAME")
    renamed(p, "--model", "the positional MODEL (sample MODEL --out DIR)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="a text file (one prompt a line) or a GenEval "
                   "evaluation_metadata.jsonl (by its .jsonl suffix)")
    renamed(p, "--prompts-file", "--prompts")
    p.add_argument("--layout", choices=("flat", "geneval"), default="flat",
                   help="flat: OUT/<00000>.png + grid.png; geneval: OUT/<00000>/samples/<0000>.png + metadata.jsonl")
    p.add_argument("--images-per-prompt", type=int, default=None, help="--layout geneval only: images a prompt; "
                   "None means 4")
    p.add_argument("--save-latents", action="store_true", help="also write the sampled latents as latents.npy")
    _add_settings(p)
    _add_run(p)
    p.set_defaults(func=_sample)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    ev = subparser(subparsers, "eval", help="FID/KID, the COCO zero-shot protocol, sampling sweeps, GenEval-style "
                   "scores of compositional scenes")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = subparser(sub, "fid", help="FID and KID between two image folders")
    p.add_argument("gen", help="folder of generated images")
    renamed(p, "--gen", "the positional GEN (eval fid GEN --ref REF)")
    p.add_argument("--ref", required=True, help="folder of reference images")
    p.add_argument("--out", default=None, help="JSON file for the result")
    p.add_argument("--device", default=None, help="None picks cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_eval_fid)

    for name, fn, helptext in [("coco", _eval_coco, "zero-shot FID/KID/CLIP score on COCO-2014 val captions"),
                               ("sweep", _eval_sweep, "a grid of samplers x steps x guidance: FID (and GenEval-style "
                                "on compositional scenes) against sampling FLOPs")]:
        p = subparser(sub, name, help=helptext)
        p.add_argument("model", help="exported model folder" + (" (or a run folder or checkpoint, exported first)"
                                                                 if name == "coco" else ""))
        renamed(p, "--model", f"the positional MODEL (eval {name} MODEL --out DIR)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--annotations", default="data/coco/annotations/captions_val2014.json")
        p.add_argument("--images", default="data/coco/val2014", help="folder of the COCO val2014 images")
        p.add_argument("--num", type=int, default=30000 if name == "coco" else 5000, help="captions to draw")
        p.add_argument("--draw-seed", type=int, default=2014)
        _add_run(p)
        p.set_defaults(func=fn)
    coco = sub.choices["coco"]
    _add_settings(coco)
    coco.add_argument("--resolution", type=int, default=None, help="image side; None means the model's (latent "
                      "size x VAE factor)")
    coco.add_argument("--clip-model", default="ViT-L-14")
    coco.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag; '' for random weights")
    coco.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    sweep = sub.choices["sweep"]
    sweep.add_argument("--guidances", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    sweep.add_argument("--presets", nargs="+", default=["heun:10", "heun:20", "heun:30", "euler:30", "euler:60",
                                                        "dpmpp_2m:15", "dpmpp_2m:30"],
                       help="SAMPLER:STEPS pairs, each swept over every guidance scale")
    for old, new in (("--steps", "--presets SAMPLER:STEPS"), ("--sampler", "--presets SAMPLER:STEPS"),
                     ("--guidance", "--guidances"), ("--prompts", "--geneval")):
        renamed(sweep, old, new)
    sweep.add_argument("--scenes", default=None, help="held-out compositional scenes (data compose --layout flat): "
                       "FID against them instead of COCO; needs --geneval")
    sweep.add_argument("--geneval", default=None, metavar="DIR", help="held-out GenEval-layout prompts (data "
                       "compose --layout geneval): the GenEval-style score of every point; needs --scenes")
    sweep.add_argument("--images-per-prompt", type=int, default=1, help="with --geneval: images a prompt")

    p = subparser(sub, "compose", help="GenEval-style scores of a GenEval-layout folder of compositional scenes")
    p.add_argument("dir", help="GenEval layout: <00000>/metadata.jsonl, <00000>/samples/<0000>.png")
    p.add_argument("--out", default=None, help="scores file; None means DIR/scores.json")
    p.add_argument("--vae", default=None, help="VAE whose reconstructions of the ground truth to score too "
                   "(None: the sampling model's VAE, named in DIR/sampling.json, if any)")
    p.set_defaults(func=_eval_compose)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add export, sample, push, serve and eval to the top-level parser."""
    p = subparser(subparsers, "export", help="write a run's network as safetensors + config.json")
    p.add_argument("run", help="runs/<stage> folder or a Composer checkpoint file")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--config", default=None, help="config.yaml of the run; None finds it "
                   "beside the checkpoint")
    p.set_defaults(func=_export)
    _register_sample(subparsers)
    p = subparser(subparsers, "push", help="upload an export (weights, config.json, model card) to the "
                  "Hugging Face Hub")
    p.add_argument("export", help="folder written by micro-diffusion export")
    p.add_argument("repo_id", help="ORG/NAME of the Hub model repository (created when absent)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--keep-card", action="store_true", help="upload README.md as it is (default: write the model "
                   "card again first, with the evaluations of these weights found beside the export)")
    p.set_defaults(func=_push)
    p = subparser(subparsers, "serve", help="a local web page (Gradio) to try an export: prompt, steps, guidance, "
                  "seed, sampler")
    p.add_argument("export", help="folder written by micro-diffusion export, or hf://ORG/NAME")
    p.add_argument("--port", type=int, default=7860, help="TCP port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="compute dtype of sampling (None: bf16 where the device runs it fast, else fp32)")
    _add_loading(p)
    p.set_defaults(func=_serve)
    _register_eval(subparsers)
