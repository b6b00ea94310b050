"""Text-to-image from an exported model: captions -> embeddings -> latents (the one sampling path) -> PIL images."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.geneval import check_line, read_prompts_file, sample_path, write_prompt, write_sample
from ..diffusion.sampling import (
    CONSISTENCY_MID_TIMES,
    FLUID_FIELDS,
    SamplingSettings,
    diffusion_samplers,
    image_seeds,
    sampler_spec,
)
from ..encoders import FrozenTextEncoder, FrozenVAE, load_text_encoder, load_vae
from ..errors import MicroDiffusionError, UsageError, check_counts, first_line
from ..exported import CONFIG_FILE, FILES, HASH, load_exported, read_config
from ..families import family, family_of
from ..models.sprint import sprint_on
from ..utils.atomic import write_text_atomic
from ..utils.devices import autocast, compute_dtype, dtype_name, torch_device
from ..utils.images import grid, save_atomic, to_pil
from ..utils.run_folder import EMA_WEIGHTS as EMA_FILE
from ..utils.run_folder import PROMPTS_RECORD, SAMPLING_RECORD
from ..utils.sizes import as_hw

Sampling = SamplingSettings | Mapping[str, Any] | None  # all settings; the ones to set (the rest: the export's); None
Prompt = str | Mapping[str, Any]  # a caption, or a GenEval metadata line ({"prompt", "tag", "include", ...})


def export_config(model: str | Path) -> dict:
    """An exported model's config.json; a missing folder or file is a usage error naming it, an unreadable one or
    one of another network format a project error naming the file."""
    if not Path(model).is_dir():
        raise UsageError(f"model folder {model} does not exist: give a folder written by `micro-diffusion export RUN "
                         "--out DIR` (or import-reference)")
    if not (Path(model) / CONFIG_FILE).is_file():
        raise UsageError(f"{model} is not an exported model (no {CONFIG_FILE}): write one with "
                         "`micro-diffusion export RUN --out DIR`")
    try:
        return read_config(model)
    except ValueError as err:  # not JSON, or another network format: the message names the folder
        raise MicroDiffusionError(f"{Path(model) / CONFIG_FILE}: {err}") from err


def check_out_folder(out: str | Path) -> None:
    """An output folder may exist (a rerun resumes) but must not be a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose a folder")


def check_request(model: str | Path, settings: Sampling = None, use_ema: bool | None = None
                  ) -> tuple[dict, SamplingSettings]:
    """(config, settings) of an export, checked before anything loads: the folder, --steps, the sampler against the
    model (check_sampling) and --ema against the weights it holds."""
    config = export_config(model)
    resolved = settings_for(config, settings)
    check_counts(steps=resolved.steps)
    check_sampling(config, resolved, str(model))
    if use_ema and not (Path(model) / EMA_FILE).is_file():
        raise UsageError(f"--ema: {Path(model) / EMA_FILE} does not exist (this export has no EMA weights): drop "
                         "--ema, or use --raw")
    return config, resolved


def settings_for(config: Mapping[str, Any], settings: Sampling = None) -> SamplingSettings:
    """The sampling settings of an export: each given one, else the export's recorded `sampling`, else its family's
    defaults for its network (MicroDiT: DEFAULTS; Fluid: FLUID_DEFAULTS, one pass a token in raster order).

    A consistency sampler (a distilled student) defaults to guidance 1 and no interval: its teacher's guidance is
    baked in. Older exports record no `sampling`; they sample with the package DEFAULTS.
    """
    if isinstance(settings, SamplingSettings):
        return settings
    names = {f.name for f in fields(SamplingSettings)}
    recorded, given = dict(config.get("sampling") or {}), {k: v for k, v in (settings or {}).items() if v is not None}
    for where, keys in (("the export's sampling", recorded), ("sampling settings", given)):
        if set(keys) - names:
            raise UsageError(f"{where}: unknown keys {sorted(set(keys) - names)} (known: {sorted(names)})")
    fam = family_of(config)
    merged = {**fam.sampling_for(config.get("network", {})).to_dict(), **recorded, **given}
    if sampler_spec(merged["sampler"]).for_students:
        merged["guidance"] = given.get("guidance", 1.0)
        merged["guidance_interval"] = given.get("guidance_interval")
        merged["guidance_mode"] = given.get("guidance_mode", "cfg")
    if sampler_spec(merged["sampler"]).schedule != "reveal":  # another sampler asked of a Fluid export: check_sampling
        merged = {k: v for k, v in merged.items() if k not in FLUID_FIELDS or k in given}  # names both families
    interval = merged["guidance_interval"]
    return SamplingSettings(steps=int(merged["steps"]), guidance=float(merged["guidance"]), sampler=merged["sampler"],
                            guidance_interval=tuple(float(v) for v in interval) if interval else None,
                            guidance_mode=merged.get("guidance_mode", "cfg"),
                            **{k: merged[k] for k in FLUID_FIELDS if merged.get(k) is not None})


def check_sampling(config: dict, settings: SamplingSettings, where: str) -> None:
    """A sampler of the export's family (naming both otherwise); a distilled student samples with `consistency` at
    1, 2 or 4 steps and no guidance (its teacher's is baked in); a diffusion model never with `consistency`. Anything
    else is an error naming the export and what to ask for instead."""
    fam, spec = family_of(config), sampler_spec(settings.sampler)
    if spec.family != fam.name:
        raise UsageError(f"{where} is a {fam.title} model ({fam.name}): the {settings.sampler} sampler samples "
                         f"{family(spec.family).title} models; use --sampler {', '.join(diffusion_samplers(fam.name))}")
    student, for_students = config.get("distilled"), spec.for_students
    if student and not for_students:
        raise UsageError(f"{where} is a distilled student (guidance {student['guidance']} baked in): sample it with "
                         f"--sampler consistency --steps 1, 2 or 4, not --sampler {settings.sampler}")
    if student and settings.guidance != 1.0:
        raise UsageError(f"{where} is a distilled student with its teacher's guidance {student['guidance']} baked "
                         f"in: drop --guidance {settings.guidance:g}")
    if not student and for_students:
        raise UsageError(f"{where} is a diffusion model: {settings.sampler} sampling needs a student made by "
                         f"`micro-diffusion distill`; use {', '.join(diffusion_samplers(fam.name))}")
    if for_students and settings.steps not in CONSISTENCY_MID_TIMES:
        raise UsageError(f"{where}: consistency sampling takes --steps "
                         f"{', '.join(map(str, sorted(CONSISTENCY_MID_TIMES)))}, not {settings.steps}")
    net = config.get("network") or {}
    if settings.guidance_mode == "path_drop" and not sprint_on(net.get("sprint_encoder_depth", 0),
                                                               net.get("sprint_decoder_depth", 0)):
        raise UsageError(f"{where} is not a SPRINT network (sprint_encoder_depth / sprint_decoder_depth 0): "
                         "--guidance-mode path_drop skips SPRINT's sparse middle; use --guidance-mode cfg")


def load_encoders(enc: Mapping[str, Any], where: str, device: torch.device, dtype: torch.dtype
                  ) -> tuple[FrozenTextEncoder, FrozenVAE]:
    """(text encoder, VAE) an export's config.json records; one that cannot be loaded is a usage error naming it."""
    text = _encoder(where, "text encoder", enc["text_encoder"],
                    lambda: load_text_encoder(enc["text_encoder"], device=device, dtype=dtype,
                                              caption_len=enc["caption_len"]))
    return text, _encoder(where, "VAE", enc["vae"], lambda: load_vae(enc["vae"], device=device, dtype=dtype))


def _encoder(where: str, what: str, name: str, load: Callable[[], Any]) -> Any:
    """load(), its failure (a moved local folder, a hub id neither cached nor reachable, a package not installed) a
    UsageError naming the encoder and the export."""
    try:
        return load()
    except (OSError, ValueError, ModuleNotFoundError) as err:  # FileNotFoundError and the hub's errors are OSErrors
        raise UsageError(f"{where}: the {what} {name!r} that its {CONFIG_FILE} records cannot be loaded "
                         f"({first_line(err)}): install or download it, or export the model again with encoders "
                         "this machine has") from err


class TextToImage:
    """An exported network with the VAE and text encoder its config names, rendering captions from per-image seeds.

    Image k of a run seeded `seed` is sampled from the seed of (seed, k) (`image_seeds`), so it does not depend on
    batching, sharding or resumption, and equals image k of a training grid with the same seed and weights.
    """

    def __init__(self, model_dir: str | Path, settings: SamplingSettings, seed: int = 0, use_ema: bool | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 compute: torch.dtype | None = None):
        self.settings, self.seed, self.device = settings, seed, torch_device(str(device) if device else None)
        self.compute = compute or compute_dtype(self.device)  # None: what the device runs fastest (bf16 or fp32)
        self.where = str(model_dir)
        self.net, self.config, null = load_exported(model_dir, use_ema, self.device)
        check_sampling(self.config, settings, self.where)
        self.family = family_of(self.config)
        enc = self.config["encoders"]
        self.text, self.vae = load_encoders(enc, self.where, self.device, dtype)
        self.null = torch.as_tensor(null.astype(np.float32), device=self.device)  # (L, D)
        if self.null.shape != (self.text.caption_len, self.text.dim):
            raise ValueError(f"null caption {tuple(self.null.shape)} does not match text encoder "
                             f"{enc['text_encoder']} ({self.text.caption_len}, {self.text.dim})")
        self.latent_hw = as_hw(self.config["network"]["latent_size"])

    @property
    def resolution(self) -> int:
        """Side of the generated images in pixels (latent side x the VAE's downsampling)."""
        return self.latent_hw[0] * int(self.config["encoders"]["downsample"])

    def record(self) -> dict:
        """What decides the images besides their captions: weights (and their xxh64, which ties an evaluation to the
        export's model card), sampling settings, seed and compute dtype."""
        weights = self.config["weights_file"]
        return {"weights": weights, "weights_xxh64": self.config.get(FILES, {}).get(weights, {}).get(HASH),
                "sampling": self.settings.to_dict(), "seed": self.seed, "dtype": dtype_name(self.compute)}

    def with_settings(self, settings: SamplingSettings, seed: int) -> TextToImage:
        """The same loaded network and encoders sampling with other settings and seed (checked against the model)."""
        check_counts(steps=settings.steps)
        check_sampling(self.config, settings, self.where)
        other = copy.copy(self)
        other.settings, other.seed = settings, seed
        return other

    def latents(self, captions: list[str], indices: list[int]) -> torch.Tensor:
        """Sampled latents (N, C, h, w) for captions, image k seeded by (seed, indices[k])."""
        return self.sample(self.text.encode(captions).to(self.device), indices)  # caption embeddings (N, L, D)

    def sample(self, emb: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Sampled latents (N, C, h, w) for caption embeddings (N, L, D): the network's part of rendering."""
        shape = (self.net.in_channels, *self.latent_hw)
        with autocast(self.device, self.compute):  # by default bf16 where the device runs it fast, else fp32
            return self.family.generate(self.net, emb, self.null, self.settings, image_seeds(self.seed, indices),
                                        shape, self.config["sigma_data"])

    @torch.no_grad()
    def __call__(self, captions: list[str], indices: list[int]) -> list[Image.Image]:
        """Render captions (one image each) to PIL images."""
        return to_pil(self.vae.decode(self.latents(captions, indices)))


def sample_geneval(render: TextToImage, lines: list[dict], out: str | Path, images_per_prompt: int = 4,
                   batch_size: int = 16, progress: bool = True) -> int:
    """Render GenEval metadata lines into GenEval's layout: image k of prompt p is image p*K+k of the run (its own seed
    from image_seeds); images already on disk are kept, so an interrupted run resumes. Returns images written."""
    todo = []
    for p, line in enumerate(lines):
        write_prompt(out, p, line)
        todo += [(p, k) for k in range(images_per_prompt) if not sample_path(out, p, k).is_file()]
    for i in tqdm(range(0, len(todo), batch_size), desc="sample", disable=not progress):
        batch = todo[i : i + batch_size]
        images = render([lines[p]["prompt"] for p, _ in batch], [p * images_per_prompt + k for p, k in batch])
        for (p, k), image in zip(batch, images, strict=True):
            write_sample(out, p, k, image)
    return len(todo)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a file: a GenEval evaluation_metadata.jsonl (by its .jsonl suffix: checked metadata lines) or a
    text file (one caption a line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    if path.suffix == ".jsonl":
        try:
            return list(read_prompts_file(path))
        except ValueError as err:  # a malformed line: the message names the file and line
            raise UsageError(str(err)) from err
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def render_captions(render: TextToImage, captions: Sequence[str], batch_size: int, progress: bool = True
                    ) -> tuple[list[Image.Image], torch.Tensor]:
    """(PIL images, float32 latents (N, C, h, w)) of captions, image k seeded by (seed, k): the one flat sampling step
    of `micro-diffusion sample` and the Python Pipeline."""
    images, latents = [], []
    for i in tqdm(range(0, len(captions), batch_size), desc="sample", disable=not progress):
        idx = list(range(i, min(i + batch_size, len(captions))))
        z = render.latents([captions[j] for j in idx], idx)  # (B, C, h, w)
        latents.append(z.float().cpu())
        images += to_pil(render.vae.decode(z))
    return images, torch.cat(latents)


def _write_flat(render: TextToImage, captions: list[str], out: Path, batch_size: int, save_latents: bool) -> int:
    """OUT/<00000>.png for each caption (image k seeded by (seed, k)), grid.png and, asked, latents.npy."""
    images, latents = render_captions(render, captions, batch_size)
    for j, im in enumerate(images):
        save_atomic(im, out / f"{j:05d}.png")
    grid(images).save(out / "grid.png")
    if save_latents:
        np.save(out / "latents.npy", latents.numpy())
    return len(images)


@torch.no_grad()
def sample(model: str | Path, prompts: Sequence[Prompt], out: str | Path, settings: Sampling = None, seed: int = 0,
           layout: Literal["flat", "geneval"] = "flat", images_per_prompt: int | None = None, batch_size: int = 16,
           use_ema: bool | None = None, device: str | None = None, save_latents: bool = False) -> dict[str, Any]:
    """Images of an exported model for prompts, written to `out`; returns what was written and how.

    layout "flat": OUT/<00000>.png per prompt, grid.png, prompts.json (and latents.npy with save_latents).
    layout "geneval": GenEval metadata lines only, `images_per_prompt` (default 4) each in GenEval's layout
    OUT/<00000>/samples/<0000>.png and sampling.json; images on disk are kept (a rerun resumes).
    model: an export folder or hf://org/name[@revision]. settings: see `settings_for` (None: the export's recorded
    settings). use_ema=None takes EMA weights when present.
    """
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE (one per line, or a GenEval "
                         "evaluation_metadata.jsonl)")
    if layout not in ("flat", "geneval"):
        raise UsageError(f"layout {layout!r} is not flat or geneval")
    if layout == "flat" and images_per_prompt is not None:
        raise UsageError("--images-per-prompt only applies to --layout geneval")
    if layout == "geneval" and (save_latents or not all(isinstance(p, Mapping) for p in prompts)):
        raise UsageError("--layout geneval takes its prompts from --prompts evaluation_metadata.jsonl alone "
                         "(no --prompt, no text file, no --save-latents)")
    k = 4 if images_per_prompt is None else images_per_prompt
    check_counts(images_per_prompt=k, batch_size=batch_size)
    check_out_folder(out)
    from .hub import resolve_model  # huggingface_hub's client (0.2 s at start-up): only sampling needs it

    source, model = str(model), resolve_model(model)  # hf://org/name: its snapshot in the Hub cache
    render = TextToImage(model, check_request(model, settings, use_ema)[1], seed, use_ema, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only once the arguments passed and the model loaded
    record: dict[str, Any] = {"model": source, **render.record()}
    if layout == "geneval":
        lines = [check_line(dict(p), f"prompt {i}") for i, p in enumerate(prompts)]
        written = sample_geneval(render, lines, out, k, batch_size)
        record.update(vae=render.config["encoders"]["vae"], images_per_prompt=k)
        write_text_atomic(out / SAMPLING_RECORD, json.dumps(record, indent=2))
        return {"out": str(out), "layout": layout, "images": written, "prompts": len(lines), "images_per_prompt": k,
                **record}
    captions = [p if isinstance(p, str) else str(p["prompt"]) for p in prompts]
    written = _write_flat(render, captions, out, batch_size, save_latents)
    write_text_atomic(out / PROMPTS_RECORD, json.dumps({**record, "prompts": captions}, indent=2))
    return {"out": str(out), "layout": layout, "images": written, "prompts": len(captions), **record}
