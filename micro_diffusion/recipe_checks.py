"""Value checks of a recipe whose keys and types the schema has passed: durations, presets, samplers, batch sizes,
ranges. Each error names the key, the value and what is accepted.

recipe.validate calls check_values, so a dry run refuses what a real run would otherwise refuse only inside Composer
or the model, seconds of imports later (or never: a negative duration trains nothing). Imports neither Composer nor
training: it sits in the data layer beside recipe.py (docs/interfaces.md, "Layers").
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from micro_diffusion.data.integrity import VERIFY_MODES
from micro_diffusion.diffusion.sampling import SAMPLERS, SamplingSettings, diffusion_samplers
from micro_diffusion.errors import UsageError
from micro_diffusion.families import FAMILIES, check_preset, config_fields, family


class RecipeError(UsageError):
    """A recipe that cannot run: the message names the file, key, stage or path."""


NULL_CAPTIONS = ("shards", "zeros")  # data.null_caption: null_caption.npy beside the shards, or all zeros
CHOICES = {"train.precision": ("auto", "fp32", "amp_bf16", "amp_fp16"), "train.parallelism": ("auto", "fsdp", "ddp",
           "none"), "train.device": ("auto", "cpu", "gpu"), "data.verify": tuple(VERIFY_MODES),
           "data.null_caption": NULL_CAPTIONS, "algorithms.gradient_clipping.type": ("norm", "value", "adaptive"),
           "distill.teacher_weights": ("auto", "ema", "raw")}

# Composer's time strings as composer.core.Time.from_timestring reads them (a number, then a unit), narrowed to what
# a recipe means: a whole number of batches, epochs, samples or tokens, or a fraction of the run ("0.5dur").
# Composer also reads "3e4tok", "-5ba", "1h2m3s", "iter", "sec" and any letter case; a recipe takes none of them.
# Composer itself is not imported here: it takes seconds. tests/test_recipe_values.py compares the two verdicts.
_TIME = re.compile(r"(?P<count>\d+)(?P<unit>ba|ep|sp|tok)|(?P<fraction>\d*\.?\d+)dur")
STEP_UNITS = ("ba", "ep", "sp", "tok")
ANY_UNITS = (*STEP_UNITS, "dur")
# key -> (units Composer takes there, whether 0 is allowed, whether null is): max_duration takes no fraction of
# itself, the console logger counts batches or epochs only; null turns validation and sample grids off.
DURATIONS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "train.max_duration": (STEP_UNITS, False, False),
    "train.log_interval": (("ba", "ep"), False, False),
    "checkpoint.save_interval": (ANY_UNITS, False, False),
    "eval.interval": (ANY_UNITS, False, True),
    "samples.interval": (ANY_UNITS, False, True),
    "scheduler.warmup": (ANY_UNITS, True, False),
    "algorithms.ema.start": (ANY_UNITS, True, False),
}
# key -> (low, high, low included, high included); None: unbounded on that side. Keys of absent sections are skipped.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.caption_drop_prob": (0, 1, True, True), "diffusion.mask_ratio": (0, 1, True, False),
    "diffusion.p_std": (0, None, False, False), "diffusion.sigma_data": (0, None, False, False),
    "optimizer.lr": (0, None, False, False), "optimizer.eps": (0, None, False, False),
    "optimizer.weight_decay": (0, None, True, False), "optimizer.moe_lr_scale": (0, None, False, False),
    "scheduler.alpha_f": (0, 1, True, True), "algorithms.gradient_clipping.threshold": (0, None, False, False),
    "algorithms.ema.smoothing": (0, 1, False, False), "samples.guidance": (1, None, True, False),
    "cost.usd_per_device_hour": (0, None, True, False), "cost.max_usd": (0, None, False, False),
    "cost.max_device_hours": (0, None, False, False), "distill.guidance": (1, None, True, False),
    "distill.sigma_max": (0, None, False, False),
}
# integer key -> least value
MINIMUM: dict[str, int] = {
    "train.global_batch": 1, "train.device_microbatch": 1, "samples.steps": 1, "eval.batches": 1,
    "eval.batch_size": 1, "data.resolution": 1, "data.vae_downsample": 1, "data.num_workers": 0,
    "model.latent_channels": 1, "model.caption_len": 1, "model.caption_dim": 1, "distill.tangent_warmup": 0,
    "train.seed": 0, "data.seed": 0, "loggers.tensorboard.flush_interval": 1,
}
# tracker options of no fixed default type: text (or null), and the tag collections each tracker takes
TRACKER_TEXT = ("tracking_uri", "experiment_name", "run_name", "log_dir", "project", "entity", "name", "group")
MODEL_SET_BY_RECIPE = {"latent_size": "data.resolution / data.vae_downsample", "in_channels": "model.latent_channels",
                       "caption_dim": "model.caption_dim"}


def get(cfg: dict, dotted: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key; absent when a section on the way is missing or off (null)."""
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def parse_time(text: str) -> tuple[float, str] | None:
    """(value, unit) of a recipe's Composer time string ("100ba" -> (100, "ba"), "0.5dur" -> (0.5, "dur")), or None."""
    match = _TIME.fullmatch(text)
    if match is None:
        return None
    if match["unit"]:
        return int(match["count"]), match["unit"]
    return float(match["fraction"]), "dur"


def duration_form(units: tuple[str, ...], zero_ok: bool) -> str:
    """What a duration key accepts, in words."""
    counts = [u for u in units if u != "dur"]
    whole = "a whole number (0 or more)" if zero_ok else "a whole number above 0"
    form = f"{whole} and a unit among {', '.join(counts)} (e.g. '100{counts[0]}', '2{counts[1]}')"
    return form + (f", or a fraction of the run as 'Xdur' with X in {'[0' if zero_ok else '(0'}, 1] (e.g. '0.5dur')"
                   if "dur" in units else "")


def check_duration(key: str, value: Any, units: tuple[str, ...], zero_ok: bool = False) -> tuple[float, str]:
    """The (value, unit) of a duration key; an error naming the key and the accepted form unless it is one."""
    parsed = parse_time(value) if isinstance(value, str) else None
    if parsed is not None and parsed[1] in units:
        number, unit = parsed
        if (number >= 0 if zero_ok else number > 0) and (unit != "dur" or number <= 1):
            return parsed
    kind = "duration" if zero_ok else "positive duration"
    raise RecipeError(f"{key}: {value!r} is not a {kind}: give {duration_form(units, zero_ok)}")


def check_durations(cfg: dict) -> None:
    """Every duration key in Composer's form with a unit Composer takes there; warmup counts in max_duration's unit."""
    for key, (units, zero_ok, nullable) in DURATIONS.items():
        present, value = get(cfg, key)
        if present and not (nullable and value is None):
            check_duration(key, value, units, zero_ok)
    present, warmup = get(cfg, "scheduler.warmup")
    if present:  # Composer converts epochs to batches and a fraction to max_duration's unit, then compares units
        run_unit = parse_time(cfg["train"]["max_duration"])[1].replace("ep", "ba")
        unit = parse_time(warmup)[1].replace("ep", "ba")
        if unit not in (run_unit, "dur"):
            raise RecipeError(f"scheduler.warmup {warmup!r} counts {unit} but train.max_duration "
                              f"{cfg['train']['max_duration']!r} counts {run_unit}: give the warmup in {run_unit}"
                              f"{' or ep' if run_unit == 'ba' else ''}, or as a fraction such as '0.05dur'")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_ranges(cfg: dict) -> None:
    """Ratios, rates and scales within their ranges; counts and sizes at least their minimum."""
    for key, (low, high, low_in, high_in) in RANGES.items():
        present, value = get(cfg, key)
        if not present or value is None:
            continue
        ok = _number(value) and (value >= low if low_in else value > low) and (
            high is None or (value <= high if high_in else value < high))
        if not ok:
            raise RecipeError(f"{key}: must be a number {_range_text(low, high, low_in, high_in)}, got {value!r}")
    for key, least in MINIMUM.items():
        present, value = get(cfg, key)
        if present and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            what = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise RecipeError(f"{key}: must be {what}, got {value!r}")
    betas = cfg["optimizer"]["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        raise RecipeError(f"optimizer.betas: two numbers in [0, 1), got {betas!r}")
    keep = cfg["checkpoint"]["keep"]
    if keep == 0 or keep < -1:
        raise RecipeError(f"checkpoint.keep: how many checkpoints to keep (1 or more, or -1 for all), got {keep}")


def check_choices(cfg: dict) -> None:
    """Keys that take one of a few words."""
    for key, allowed in CHOICES.items():
        present, value = get(cfg, key)
        if present and value not in allowed:
            raise RecipeError(f"{key}: unknown value {value!r} (allowed: {', '.join(allowed)})")


def check_batches(cfg: dict) -> None:
    """The microbatch divides the global batch (plan_run checks the per-device batch once the world size is known)."""
    t = cfg["train"]
    if t["global_batch"] % t["device_microbatch"]:
        raise RecipeError(f"train.device_microbatch {t['device_microbatch']} does not divide train.global_batch "
                          f"{t['global_batch']}: give a divisor of the per-device batch (global batch / devices)")


def check_samples(cfg: dict) -> None:
    """A known sampler of the family: a diffusion one, or the students' one in a distillation recipe; settings it
    reads."""
    s, fam = cfg["samples"], family(cfg["model"]["family"])
    sampler = s["sampler"]
    students = sorted(k for k, v in SAMPLERS.items() if v.for_students and v.family == fam.name)
    allowed = diffusion_samplers(fam.name) + (students if cfg["distill"] is not None else [])
    if sampler in SAMPLERS and SAMPLERS[sampler].family != fam.name:
        raise RecipeError(f"samples.sampler: {sampler!r} samples {family(SAMPLERS[sampler].family).title} models; "
                          f"model.family is {fam.name} ({fam.title}): use {', '.join(allowed)}")
    if sampler in SAMPLERS and sampler not in allowed:
        raise RecipeError(f"samples.sampler: {sampler!r} samples distilled students (recipes with a distill: "
                          f"section); a diffusion stage takes one of {', '.join(allowed)}")
    if sampler not in allowed:
        raise RecipeError(f"samples.sampler: unknown sampler {sampler!r} (allowed: {', '.join(allowed)})")
    try:
        SamplingSettings(steps=s["steps"], guidance=s["guidance"], sampler=sampler, temperature=s["temperature"],
                         head_steps=s["head_steps"])
    except UsageError as err:
        raise RecipeError(f"samples: {err}") from err


def check_family(cfg: dict) -> None:
    """The family exists and the recipe sets what it reads: its diffusion keys, and nothing it would ignore."""
    name = cfg["model"]["family"]
    if name not in FAMILIES:
        raise RecipeError(f"model.family: unknown family {name!r} (allowed: {', '.join(FAMILIES)})")
    fam = FAMILIES[name]
    for key, value in cfg["diffusion"].items():
        if key in fam.diffusion_keys and value is None:
            raise RecipeError(f"diffusion.{key}: {fam.title} reads it: give a number")
        if key not in fam.diffusion_keys and value is not None:
            raise RecipeError(f"diffusion.{key}: {fam.title} (model.family={name}) does not read it (it reads "
                              f"{', '.join('diffusion.' + k for k in fam.diffusion_keys)}): set diffusion.{key}=null")
    if cfg["distill"] is not None and not fam.distills:
        raise RecipeError(f"distill: consistency distillation applies to MicroDiT teachers; model.family is {name} "
                          f"({fam.title})")
    if cfg["eval"]["sigmas"] is not None and not fam.noise_grid:
        raise RecipeError(f"eval.sigmas: {fam.title} has no EDM noise levels to average over: set eval.sigmas=null")


def _fits(type_name: str, value: Any) -> bool:
    """Whether an override fits its network config's field: an int, a number, or a pair of positive numbers (other
    tuples, such as DiTConfig.routes, the config checks itself)."""
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return _number(value)
    if type_name == "tuple[float, float]":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) and v > 0 for v in value)
    return True  # a field of another type: the network's own code reads it


def check_model(cfg: dict, latent_side: int) -> None:
    """A preset of the recipe's family; override keys its config has, with values the network can be built from (no
    weights)."""
    m = cfg["model"]
    try:
        fam = check_preset(m["preset"], m["family"], "model.preset")
    except UsageError as err:
        raise RecipeError(str(err)) from err
    types = config_fields(fam)
    for key, value in m["overrides"].items():
        if key in MODEL_SET_BY_RECIPE:
            raise RecipeError(f"model.overrides.{key}: set by the recipe ({MODEL_SET_BY_RECIPE[key]}), not here")
        if key not in types:
            raise RecipeError(f"model.overrides.{key}: unknown model option (allowed: "
                              f"{', '.join(sorted(set(types) - set(MODEL_SET_BY_RECIPE)))})")
        if not _fits(types[key], value):
            raise RecipeError(f"model.overrides.{key}: expected {types[key]}, got {value!r}")
    try:
        net = replace(fam.presets[m["preset"]](), latent_size=latent_side, in_channels=m["latent_channels"],
                      caption_dim=m["caption_dim"], **m["overrides"])  # Fluid's config checks itself here
        fam.check_network(net, latent_side, cfg["samples"]["steps"])
    except ValueError as err:
        raise RecipeError(f"model (preset and overrides): {err}") from err


def check_streams(cfg: dict) -> None:
    """At least one training stream; stream proportions positive."""
    if not cfg["data"]["streams"]:
        raise RecipeError("data.streams: empty; give at least one stream such as [{local: latents}]")
    for key in ("streams", "val_streams"):
        for i, stream in enumerate(cfg["data"][key]):
            share = stream["proportion"]
            if share is not None and not (_number(share) and share > 0):
                raise RecipeError(f"data.{key}[{i}].proportion: a number > 0 or null, got {share!r}")


def check_links(cfg: dict) -> None:
    """Keys that must agree with each other."""
    d = cfg["data"]
    if d["resolution"] % d["vae_downsample"]:
        raise RecipeError(f"data.resolution {d['resolution']} is not a multiple of data.vae_downsample "
                          f"{d['vae_downsample']}")
    if cfg["eval"]["interval"] and not d["val_streams"]:
        raise RecipeError("eval.interval is set but data.val_streams is empty: give held-out shards or set "
                          "eval.interval=null")
    if cfg["samples"]["interval"] and not cfg["samples"]["prompts"]:
        raise RecipeError("samples.interval is set but samples.prompts is empty")
    sigmas = cfg["eval"]["sigmas"]
    if sigmas is not None and (not isinstance(sigmas, int) or isinstance(sigmas, bool) or sigmas < 1):
        raise RecipeError(f"eval.sigmas: a number of noise levels (a positive integer) or null, got {sigmas!r}")
    if cfg["init_from"] is not None and cfg["init_checkpoint"] is not None:
        raise RecipeError(f"init_from ({cfg['init_from']}) and init_checkpoint ({cfg['init_checkpoint']}) are both "
                          "set: a stage starts from one of them (set init_from=null to start from init_checkpoint)")
    if cfg["distill"] is not None:
        if cfg["init_from"] is None and cfg["init_checkpoint"] is None:
            raise RecipeError("distill: the teacher is the stage's starting weights: set init_from or "
                              "init_checkpoint")
        if cfg["diffusion"]["mask_ratio"] != 0:
            raise RecipeError(f"distill: consistency distillation trains unmasked; diffusion.mask_ratio is "
                              f"{cfg['diffusion']['mask_ratio']}, set it to 0")
        routes = (cfg["model"].get("overrides") or {}).get("routes")
        if routes:
            raise RecipeError(f"distill with model.overrides.routes {routes!r}: the student's JVP and its forward "
                              "would draw routes separately; distill an unrouted network (routes: [])")
        if cfg["train"]["activation_checkpointing"]:
            raise RecipeError("train.activation_checkpointing with distill: the student's JVP (forward-mode AD) does "
                              "not run through recomputed blocks; set train.activation_checkpointing=false")


def check_trackers(cfg: dict) -> None:
    """Tracker names and folders are text (or null); MLflow's tags a mapping, W&B's a list, of text."""
    for tracker, options in cfg["loggers"].items():
        for key, value in options.items():
            where = f"loggers.{tracker}.{key}"
            if key in TRACKER_TEXT and value is not None and not isinstance(value, str):
                raise RecipeError(f"{where}: expected text or null, got {value!r}")
            if key == "tags" and tracker == "mlflow" and value is not None and not (
                    isinstance(value, dict) and all(isinstance(k, str) for k in value)):
                raise RecipeError(f"{where}: expected a mapping of tag names to values, or null, got {value!r}")
            if key == "tags" and tracker == "wandb" and not all(isinstance(t, str) for t in value):
                raise RecipeError(f"{where}: expected a list of text tags, got {value!r}")


def check_values(cfg: dict) -> None:
    """Every value of a filled-in recipe that a run would use; the first bad one raises, naming its key."""
    check_family(cfg)
    check_choices(cfg)
    check_ranges(cfg)  # sizes positive before anything divides by them
    check_durations(cfg)
    check_batches(cfg)
    check_samples(cfg)
    check_streams(cfg)
    check_links(cfg)
    check_trackers(cfg)
    check_model(cfg, cfg["data"]["resolution"] // cfg["data"]["vae_downsample"])
