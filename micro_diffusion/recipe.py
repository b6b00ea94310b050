"""Stage recipes: YAML files with a `base:` chain, `key.sub=value` overrides, and a schema that rejects typos.

A recipe is a nested dict. Every key must appear in SCHEMA (its value there is the default); a few sections are
open (`model.overrides`, checked against the model's config) and two are lists of stream dicts. Algorithms and
schedulers are checked against their own registries so an unknown name is an error that names it; every value is
then checked by recipe_checks (durations, presets, samplers, batches, ranges), so a dry run refuses what a run would.
Read by training, the cost estimate, data checks and experiments alike, so it sits in the data layer and imports
nothing from training (docs/interfaces.md, "Layers").
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from micro_diffusion.diffusion.edm import SIGMA_DATA
from micro_diffusion.diffusion.sampling import DEFAULTS
from micro_diffusion.families import family_of
from micro_diffusion.recipe_checks import RecipeError, check_values  # RecipeError: imported from here by callers

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the repository's recipes/, beside the package

STREAM_KEYS = {"local": None, "remote": None, "proportion": None}

ALGORITHMS: dict[str, dict[str, Any]] = {
    "gradient_clipping": {"type": "norm", "threshold": 1.0},
    "ema": {"smoothing": 0.9999, "start": "0ba"},
    "low_precision_layernorm": {},
}
SCHEDULERS: dict[str, dict[str, Any]] = {
    "cosine_warmup": {"warmup": "0ba", "alpha_f": 0.0},
    "constant_warmup": {"warmup": "0ba"},
    "constant": {},
}
# Experiment trackers: a block per Composer logger (composer.loggers MLFlowLogger, TensorboardLogger, WandBLogger),
# its keys passed to that logger's constructor. None of a folder or URI means the run folder's own (the builder fills
# it); docs/trackers.md. tests/test_trackers.py checks every key is a parameter of Composer's class.
LOGGERS: dict[str, dict[str, Any]] = {
    "mlflow": {"tracking_uri": None, "experiment_name": "micro-diffusion", "run_name": None, "tags": None,
               "log_system_metrics": True},  # tracking_uri None: file:<run folder>/mlruns
    "tensorboard": {"log_dir": None, "flush_interval": 100},  # log_dir None: <run folder>/tensorboard
    "wandb": {"project": "micro-diffusion", "entity": None, "name": None, "group": None, "tags": []},
}

# Every key a recipe may set, with its default: the paper's stage 1. Any recipe is merged over this table first, as
# over a base file, so a recipe without `base:` is stage 1 too. recipes/base.yaml states the same values for
# readers; tests/test_recipes.py fails on any key where the two differ.
SCHEMA: dict[str, Any] = {
    "base": None,  # file this one merges over (resolved while loading, then dropped)
    "stage": None,  # this stage's name; also the default run folder name
    "stages": ["res256_masked", "res256_finetune", "res512_masked", "res512_finetune"],  # init_from follows this
    "init_from": None,  # stage whose latest checkpoint gives the starting weights (not its optimizer)
    "init_checkpoint": None,  # instead of init_from: a Composer checkpoint (path or URI) or an export folder
    "runs_root": "runs",
    "model": {"family": "dit", "preset": "MicroDiT_XL_2", "overrides": {}, "latent_channels": 4, "caption_len": 77,
              "caption_dim": 1024},
    "data": {"root": "data/latents", "resolution": 256, "vae_downsample": 8,
             "streams": [{"local": name} for name in ("sa1b", "cc12m", "textcaps", "journeydb", "diffusiondb")],
             "val_streams": [{"local": "val"}], "caption_drop_prob": 0.1, "null_caption": "shards", "num_workers": 8,
             "seed": 17, "verify": "size", "skip_bad_samples": False},
    "diffusion": {"mask_ratio": 0.75, "p_mean": -0.6, "p_std": 1.2, "sigma_data": SIGMA_DATA},
    "optimizer": {"lr": 2.4e-4, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.1, "moe_lr_scale": 0.5},
    "scheduler": {"name": "cosine_warmup", "warmup": "2500ba", "alpha_f": 0.33},  # options: SCHEDULERS[name]
    "algorithms": {"gradient_clipping": {"type": "norm", "threshold": 0.25}},  # name -> options, or null: off
    "train": {"global_batch": 2048, "device_microbatch": 256, "max_duration": "250000ba", "device": "auto",
              "precision": "auto", "parallelism": "auto", "compile": False, "activation_checkpointing": False,
              "seed": 18, "log_interval": "100ba", "progress_bar": True},
    "checkpoint": {"save_folder": None, "save_interval": "2000ba", "keep": 3},
    "eval": {"interval": "5000ba", "batches": 8, "batch_size": 32, "seed": 0, "sigmas": None},
    "samples": {"interval": "10000ba", "prompts": [
        "a photo of a red fox sitting in the snow",
        "an astronaut riding a horse on the moon, digital art",
        "a bowl of ramen on a wooden table, studio lighting",
        "a watercolor painting of a lighthouse at sunset",
        "a close-up portrait of an old man with a white beard",
        "a futuristic city skyline at night with neon lights",
        "a cat wearing sunglasses lying on a beach towel",
        "a mountain lake surrounded by pine trees in autumn",
    ], "steps": DEFAULTS.steps, "guidance": DEFAULTS.guidance, "sampler": DEFAULTS.sampler,
                "temperature": None, "head_steps": None, "seed": 0},
    "cost": {"usd_per_device_hour": None, "max_usd": None, "max_device_hours": None, "device_type": None},
    "distill": None,  # a section (DISTILL's options) makes the stage a consistency distillation of its init weights
    "loggers": {},  # experiment trackers: name (LOGGERS) -> options, or null: off; none by default
}
# Continuous-time consistency distillation (sCD) of the stage's starting weights, the teacher.
DISTILL: dict[str, Any] = {
    "guidance": DEFAULTS.guidance,  # the teacher's classifier-free guidance scale, baked into the student
    "tangent_warmup": 1000,  # steps over which the tangent's second term rises from 0 to 1
    "sigma_max": 80.0,  # the highest noise level trained and sampled from
    "teacher_weights": "auto",  # auto (EMA weights when the teacher has them), ema or raw
}
# Numbers a recipe may switch off with null: the EDM keys a family does not read (Fluid: recipe_checks.check_family)
NULLABLE = ("diffusion.mask_ratio", "diffusion.p_mean", "diffusion.p_std")
OPEN_SECTIONS = ("model.overrides",)  # any keys (the model's own config checks them)
STREAM_LISTS = ("data.streams", "data.val_streams")  # lists of {"local", "remote", "proportion"}
NAMED_SECTIONS = ("scheduler",)  # a `name:` picks a registry entry; a section naming one replaces the old whole
# options checked against the registry (validate)
REGISTRY_SECTIONS = {"scheduler": SCHEDULERS, "algorithms": ALGORITHMS, "loggers": LOGGERS}


def find_recipe(path: str | os.PathLike) -> Path:
    """A recipe path as given when it exists (relative to the current folder), else under the repository's recipes/
    ("recipes/demo_masked.yaml" and "demo_masked.yaml" both work from any folder)."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("recipes",) else given.parts
    packaged = RECIPES_DIR.joinpath(*parts) if parts else RECIPES_DIR
    return packaged if packaged.is_file() else given


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (a relative path is also looked up in {RECIPES_DIR})")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict, over: dict, _where: str = "") -> dict:
    """Deep-merge `over` into a copy of `base`: sections merge key by key, other values replace.

    A NAMED_SECTIONS section that gives a `name:` replaces the old one whole: a new scheduler brings its own options
    and nothing of the old one's.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        dotted = f"{_where}.{key}" if _where else key
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not (
                dotted in NAMED_SECTIONS and "name" in value):
            out[key] = merge(out[key], value, dotted)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_file(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and merge it over its `base:` chain (paths relative to the file, else as find_recipe)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: `base:` chain loops ({' -> '.join(str(p) for p in _seen)})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    beside = path.parent / base
    return merge(load_file(beside if beside.is_file() else find_recipe(base), (*_seen, path)), data)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Command-line `key.sub=value` strings as {dotted key: value}, values parsed as YAML (`0.5`, `null`, `[1, 2]`)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        out[dotted.strip()] = yaml.safe_load(raw)
    return out


def apply_overrides(cfg: dict, overrides: Mapping[str, Any] | Sequence[str]) -> dict:
    """Set {dotted key: value} overrides (or the command line's `key.sub=value` strings) in a copy of a recipe."""
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    cfg = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        node = cfg
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {dotted}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = copy.deepcopy(value)
    return cfg


def _check_streams(value: Any, where: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecipeError(f"{where}: expected a list of streams, got {value!r}")
    out = []
    for i, stream in enumerate(value):
        if not isinstance(stream, dict):
            raise RecipeError(f"{where}[{i}]: expected a mapping with local/remote/proportion, got {stream!r}")
        out.append(_fill(stream, STREAM_KEYS, f"{where}[{i}]"))
    return out


def _fill(given: dict, schema: dict, where: str) -> dict:
    """Check `given` against `schema` key by key and return it with defaults filled in."""
    unknown = sorted(set(given) - set(schema))
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(f"unknown recipe key {prefix}{unknown[0]} (allowed here: {', '.join(sorted(schema))})")
    out = {}
    for key, default in schema.items():
        dotted = f"{where}.{key}" if where else key
        value = given.get(key, copy.deepcopy(default))
        if dotted in OPEN_SECTIONS:
            value = dict(value or {})
        elif dotted in STREAM_LISTS:
            value = _check_streams(value, dotted)
        elif dotted in REGISTRY_SECTIONS:
            pass  # checked against its registry by validate
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{dotted}: expected a section (mapping), got {value!r}")
            value = _fill(value, default, dotted)
        elif key in given:
            value = _typed(value, default, dotted)
        out[key] = value
    return out


def _typed(value: Any, default: Any, dotted: str) -> Any:
    """Check a scalar against its default's type (YAML 1.1 reads `1e-3` as a string: numeric strings become floats)."""
    if default is None or value is None and (not isinstance(default, (bool, int, float)) or dotted in NULLABLE):
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise RecipeError(f"{dotted}: expected {type(default).__name__} like {default!r}, got {value!r}")
    return value


def _check_named(section: dict | None, registry: dict, kind: str, where: str) -> dict:
    """Fill the options of one registry entry (scheduler) with defaults; unknown names or options are errors."""
    name = (section or {}).get("name")
    if name not in registry:
        raise RecipeError(f"{where}.name: unknown {kind} {name!r} (known: {', '.join(registry)})")
    options = {k: v for k, v in section.items() if k != "name"}
    return {"name": name, **_fill(options, registry[name], where)}


def check_registry_block(block: Any, registry: dict[str, dict[str, Any]], kind: str, where: str
                         ) -> dict[str, dict[str, Any]]:
    """A mapping of registry names to options (`algorithms:`, `loggers:`), each filled with its defaults; a name set
    to null is off (it switches off what a base file enabled). An unknown name or option is an error naming it and
    the allowed ones."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise RecipeError(f"{where}: expected a mapping of {kind}s ({', '.join(registry)}), got {block!r}")
    out = {}
    for name, options in block.items():
        if name not in registry:
            raise RecipeError(f"{where}.{name}: unknown {kind} {name!r} (allowed: {', '.join(registry)})")
        if options is not None:
            if not isinstance(options, dict):
                raise RecipeError(f"{where}.{name}: expected a mapping of options (allowed: "
                                  f"{', '.join(registry[name])}), got {options!r}")
            out[name] = _fill(options, registry[name], f"{where}.{name}")
    return out


def check_loggers(block: Any, where: str = "loggers") -> dict[str, dict[str, Any]]:
    """A `loggers:` block (a recipe's or an experiment's): trackers with their options filled with defaults."""
    return check_registry_block(block, LOGGERS, "logger", where)


def validate(cfg: dict) -> dict:
    """Merge the recipe over SCHEMA's defaults, check every key against it and the registries and every value
    (recipe_checks.check_values: durations, presets, samplers, batches, ranges); return the result."""
    given = merge({k: v for k, v in SCHEMA.items() if k != "base"}, {k: v for k, v in cfg.items() if k != "base"})
    out = _fill(given, SCHEMA, "")
    out.pop("base")
    out["scheduler"] = _check_named(given["scheduler"], SCHEDULERS, "scheduler", "scheduler")
    out["algorithms"] = check_registry_block(given["algorithms"], ALGORITHMS, "algorithm", "algorithms")
    out["loggers"] = check_loggers(given["loggers"])
    if given["distill"] is not None:
        out["distill"] = _fill(given["distill"] or {}, DISTILL, "distill")
    if not out["stage"]:
        raise RecipeError("recipe has no `stage:` name")
    check_values(out)
    return out


def check_stage_order(cfg: dict) -> None:
    """`init_from` must name the stage right before this one in `stages` (none for the first stage)."""
    stage, stages, init = cfg["stage"], cfg["stages"], cfg["init_from"]
    if cfg["init_checkpoint"] is not None:  # explicit starting weights: any stage may start from them
        return
    if not stages:
        if init is not None:
            raise RecipeError(f"stage {stage!r} starts from {init!r} but the recipe lists no `stages:` order")
        return
    if stage not in stages:
        raise RecipeError(f"stage {stage!r} is not in stages {stages}")
    i = stages.index(stage)
    expected = stages[i - 1] if i > 0 else None
    if init != expected:
        want = f"init_from: {expected}" if expected else "no init_from (it is the first stage)"
        raise RecipeError(f"wrong stage order: stage {stage!r} has init_from: {init} but needs {want} "
                          f"(stages: {' -> '.join(stages)})")


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any],
                overrides: Mapping[str, Any] | Sequence[str] | None = None) -> dict:
    """Read a recipe file (found by find_recipe) or take a recipe mapping, merge it over its base chain, apply
    overrides ({dotted key: value}, or `key.sub=value` strings), validate and fill defaults."""
    if isinstance(recipe, Mapping):
        cfg = dict(recipe)
        base = cfg.pop("base", None)
        cfg = merge(load_file(find_recipe(base)), cfg) if base is not None else cfg
    else:
        cfg = load_file(find_recipe(recipe))
    cfg = validate(apply_overrides(cfg, overrides or {}))
    check_stage_order(cfg)
    return cfg


def latent_size(cfg: dict) -> int:
    """Latent side: image resolution over the VAE's downsampling factor."""
    return cfg["data"]["resolution"] // cfg["data"]["vae_downsample"]


def resolve_streams(cfg: dict, key: str = "streams") -> list[dict]:
    """Stream dicts with local paths joined to data.root (absolute paths and remotes kept)."""
    root = Path(cfg["data"]["root"])
    out = []
    for s in cfg["data"][key]:
        local = s["local"]
        if local is not None and not Path(local).is_absolute():
            local = str(root / local)
        out.append({**s, "local": local})
    return out


def is_remote(path: str | None) -> bool:
    """True for object-store URIs (s3://, gs://, oci://, ...)."""
    return path is not None and "://" in path


def build_network(cfg: dict) -> nn.Module:
    """The recipe's preset of its model family with its overrides, sized for the recipe's latents and captions."""
    m = cfg["model"]
    try:
        return family_of(m).create(m["preset"], latent_size=latent_size(cfg), in_channels=m["latent_channels"],
                          caption_dim=m["caption_dim"], **m["overrides"])
    except (KeyError, TypeError) as err:
        raise RecipeError(f"model: {err}") from err
