"""Subcommands `export`, `sample` and `eval {fid, coco, sweep, compose}` of the micro-diffusion console script."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.geneval import read_prompts_file
from ..diffusion.sampling import DEFAULTS, SAMPLERS, SamplingSettings
from ..utils.images import grid, save_atomic, to_pil
from .coco import evaluate_coco, rank_world
from .fid import fid_kid
from .generate import TextToImage, sample_geneval
from .sweep import run_sweep


def _settings(args: argparse.Namespace) -> SamplingSettings:
    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    guidance = args.guidance if args.guidance is not None else 1.0 if args.sampler == "consistency" else \
        DEFAULTS.guidance  # a distilled student has its teacher's guidance baked in
    return SamplingSettings(steps=args.steps, guidance=guidance, sampler=args.sampler, guidance_interval=interval)


def _use_ema(args: argparse.Namespace) -> bool | None:
    """--ema: EMA weights (an error when the export has none); --raw: raw weights; neither: EMA when present."""
    return True if args.ema else False if args.raw else None


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=DEFAULTS.steps,
                   help="noise levels (Heun spends 2*steps-1 evaluations; a distilled student 1, 2 or 4)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance scale (1 = none; default {DEFAULTS.guidance:g}, none for consistency)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="apply guidance only for sigma in [lo, hi]")
    p.add_argument("--sampler", default=DEFAULTS.sampler, choices=sorted(SAMPLERS))
    p.add_argument("--seed", type=int, default=0, help="image k uses the seed of (SEED, k), as training grids do")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--raw", action="store_true", help="the raw weights, even when the export has EMA weights")
    weights.add_argument("--ema", action="store_true", help="the EMA weights (an error when the export has none)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=16)


def _export(args: argparse.Namespace) -> int:
    from ..training.export import export_run  # imports Composer (seconds): only this command needs it

    out = export_run(args.run_or_checkpoint, args.out, args.config)
    print(f"exported {args.run_or_checkpoint} -> {out}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line["prompt"] for line in read_prompts_file(args.prompts_file)]
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts FILE (one per line) or "
                         "--prompts-file evaluation_metadata.jsonl")
    return prompts


def _sample_geneval(args: argparse.Namespace) -> int:
    """`sample --layout geneval`: GenEval's layout for a GenEval prompt file, one seed an image."""
    if not args.prompts_file or args.prompt or args.prompts or args.save_latents:
        raise ValueError("--layout geneval takes its prompts from --prompts-file evaluation_metadata.jsonl alone "
                         "(no --prompt, --prompts or --save-latents)")
    k = 4 if args.images_per_prompt is None else args.images_per_prompt
    if k < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {k}")
    lines = read_prompts_file(args.prompts_file)
    render = TextToImage(args.model, _settings(args), args.seed, _use_ema(args), args.device)
    out = Path(args.out)
    written = sample_geneval(render, lines, out, k, args.batch_size)
    (out / "sampling.json").write_text(json.dumps({"model": str(args.model), **render.record(),
                                                   "vae": render.config["encoders"]["vae"], "images_per_prompt": k,
                                                   "prompts_file": str(args.prompts_file)}, indent=2))
    print(f"wrote {written} images ({len(lines)} prompts x {k}, GenEval's layout) to {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    if args.layout == "geneval":
        return _sample_geneval(args)
    if args.images_per_prompt is not None:
        raise ValueError("--images-per-prompt only applies to --layout geneval")
    prompts = _read_prompts(args)
    render = TextToImage(args.model, _settings(args), args.seed, _use_ema(args), args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, latents = [], []
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="sample"):
        idx = list(range(i, min(i + args.batch_size, len(prompts))))
        z = render.latents([prompts[j] for j in idx], idx)  # (B, C, h, w)
        latents.append(z.float().cpu())
        images += to_pil(render.vae.decode(z))
    for j, im in enumerate(images):
        save_atomic(im, out / f"{j:05d}.png")
    grid(images).save(out / "grid.png")
    if args.save_latents:
        np.save(out / "latents.npy", torch.cat(latents).numpy())
    (out / "prompts.json").write_text(json.dumps({"model": str(args.model), **render.record(), "prompts": prompts},
                                                 indent=2))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    result = fid_kid(args.gen, args.ref, device=args.device, batch_size=args.batch_size)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _eval_coco(args: argparse.Namespace) -> int:
    model = Path(args.model)
    out = Path(args.out)
    plan = {"model": str(model), "annotations": args.annotations, "images": args.images, "out": str(out),
            "num": args.num, "draw_seed": args.draw_seed, "clip_model": args.clip_model,
            "clip_pretrained": args.clip_pretrained, "sampling": _settings(args).to_dict(), "seed": args.seed,
            "inputs_present": {k: Path(v).exists() for k, v in
                               [("model", model), ("annotations", args.annotations), ("images", args.images)]}}
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    if not (model / "model.safetensors").is_file():  # a run folder or checkpoint: export it first, beside the results
        from ..training.export import export_run  # imports Composer (seconds): only a run folder needs it

        if rank_world()[1] > 1:  # ranks exporting at once would race on one folder
            raise ValueError(f"{model} is not an exported model: with several processes, run "
                             f"`micro-diffusion export {model} --out DIR` first and pass --model DIR")
        model = export_run(model, out / "model")
    result = evaluate_coco(model, args.annotations, args.images, out, _settings(args), args.seed, _use_ema(args),
                           args.num, args.draw_seed, args.resolution, args.clip_model, args.clip_pretrained or None,
                           args.batch_size, args.device)
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _eval_compose(args: argparse.Namespace) -> int:
    from .compose import write_scores  # the scorer and its reader: only this command needs them

    folder = Path(args.dir)
    vae_spec = args.vae
    if vae_spec is None and (folder / "sampling.json").is_file():  # samples of a model: its VAE's ceiling
        vae_spec = json.loads((folder / "sampling.json").read_text()).get("vae")
    vae = None
    if vae_spec:
        from ..encoders import load_vae

        vae = load_vae(vae_spec, device="cpu")
    path, scores = write_scores(folder, args.out, vae)
    rows = {"scores": scores, **{k: v for k, v in scores.get("reader", {}).items() if isinstance(v, dict)}}
    print(f"{'':14s}" + "".join(f"{t:>14s}" for t in scores["tasks"]) + f"{'overall':>10s}")
    for name, part in rows.items():
        print(f"{name:14s}" + "".join(f"{part['tasks'][t]['accuracy']:14.3f}" for t in scores["tasks"])
              + f"{part['overall']:10.3f}")
    print(f"wrote {path}")
    return 0


def _eval_sweep(args: argparse.Namespace) -> int:
    if (args.scenes is None) != (args.prompts is None):
        raise SystemExit("micro-diffusion eval sweep: --scenes and --prompts go together (the compositional set)")
    result = run_sweep(args.model, args.out, args.presets, args.guidances, num=args.num, annotations=args.annotations,
                       images=args.images, scenes=args.scenes, prompts=args.prompts,
                       images_per_prompt=args.images_per_prompt, seed=args.seed, use_ema=_use_ema(args),
                       device=args.device, batch_size=args.batch_size, base=_settings(args), draw_seed=args.draw_seed)
    print(json.dumps(result["settings"], indent=2))
    for p in result["points"]:
        quality = f"FID {p['fid']:.2f}" + (f", GenEval-style {p['geneval']['overall']:.3f}" if "geneval" in p else "")
        print(f"{p['sampler']:>10s} {p['steps']:3d} steps  guidance {p['guidance']:<4g} {p['flops_per_image']:.3g} "
              f"FLOPs/image  {p['images_per_s']:.2f} img/s  {quality}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add export, sample and eval to the top-level parser."""
    p = subparsers.add_parser("export", help="write a run's network as safetensors + config.json")
    p.add_argument("run_or_checkpoint", help="runs/<stage> folder or a Composer checkpoint file")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="config.yaml of the run (default: found beside the checkpoint)")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("sample", help="generate images from an exported model")
    p.add_argument("--model", required=True, help="folder written by micro-diffusion export")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--prompts-file", default=None, help="GenEval metadata file (evaluation_metadata.jsonl)")
    p.add_argument("--layout", choices=("flat", "geneval"), default="flat",
                   help="flat: OUT/<00000>.png + grid.png; geneval: OUT/<00000>/samples/<0000>.png + metadata.jsonl")
    p.add_argument("--images-per-prompt", type=int, default=None, help="--layout geneval: images a prompt (default 4)")
    p.add_argument("--out", required=True)
    p.add_argument("--save-latents", action="store_true", help="also write the sampled latents as latents.npy")
    _add_sampling(p)
    p.set_defaults(func=_sample)

    ev = subparsers.add_parser("eval", help="FID/KID, the COCO zero-shot protocol, sampling sweeps, GenEval-style "
                               "scores of compositional scenes")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("fid", help="FID and KID between two image folders")
    p.add_argument("--gen", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--out", default=None, help="JSON file for the result")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_eval_fid)

    for name, fn, helptext in [("coco", _eval_coco, "zero-shot FID/KID/CLIP score on COCO-2014 val captions"),
                               ("sweep", _eval_sweep, "a grid of samplers x steps x guidance: FID (and GenEval-style "
                                "on compositional scenes) against sampling FLOPs")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="exported model folder (coco also takes a run or checkpoint)")
        p.add_argument("--annotations", default="data/coco/annotations/captions_val2014.json")
        p.add_argument("--images", default="data/coco/val2014", help="folder of the COCO val2014 images")
        p.add_argument("--out", required=True)
        p.add_argument("--num", type=int, default=30000 if name == "coco" else 5000, help="captions to draw")
        p.add_argument("--draw-seed", type=int, default=2014)
        _add_sampling(p)
        p.set_defaults(func=fn)
    p = sub.add_parser("compose", help="GenEval-style scores of a GenEval-layout folder of compositional scenes")
    p.add_argument("dir", help="GenEval layout: <00000>/metadata.jsonl, <00000>/samples/<0000>.png")
    p.add_argument("--out", default=None, help="scores file (default DIR/scores.json)")
    p.add_argument("--vae", default=None, help="VAE whose reconstructions of the ground truth to score too "
                   "(default: the sampling model's, named in DIR/sampling.json, if any)")
    p.set_defaults(func=_eval_compose)
    coco = sub.choices["coco"]
    coco.add_argument("--resolution", type=int, default=None, help="default: the model's (latent size x VAE factor)")
    coco.add_argument("--clip-model", default="ViT-L-14")
    coco.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag; '' for random weights")
    coco.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    sweep = sub.choices["sweep"]
    sweep.add_argument("--guidances", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    sweep.add_argument("--presets", nargs="+", default=["heun:10", "heun:20", "heun:30", "euler:30", "euler:60",
                                                        "dpmpp_2m:15", "dpmpp_2m:30"],
                       help="SAMPLER:STEPS pairs, each swept over every guidance scale")
    sweep.add_argument("--scenes", default=None, help="held-out compositional scenes (data compose --layout folder): "
                       "FID against them instead of COCO; needs --prompts")
    sweep.add_argument("--prompts", default=None, help="held-out GenEval-layout prompts (data compose --layout "
                       "geneval): the GenEval-style score of every point")
    sweep.add_argument("--images-per-prompt", type=int, default=1, help="with --prompts: images a prompt")
