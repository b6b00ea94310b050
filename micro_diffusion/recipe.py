"""Stage recipes: YAML files with a `base:` chain, `key.sub=value` overrides, and a schema that rejects typos.

A recipe is a nested dict. Every key must appear in SCHEMA (its value there is the default); a few sections are
open (`model.overrides`, checked by the model's own config) and two are lists of stream dicts. Algorithms and
schedulers are checked against their own registries so an unknown name is an error that names it.
Read by training, the cost estimate, data checks and experiments alike, so it sits in the data layer and imports
nothing from training (docs/interfaces.md, "Layers").
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

OPEN = "__open_dict__"  # marker: any keys allowed (checked downstream)
STREAMS = "__streams__"  # marker: a list of {"local", "remote", "proportion"}
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

SCHEMA: dict[str, Any] = {
    "base": None,  # file this one merges over (resolved while loading, then dropped)
    "stage": None,  # this stage's name; also the default run folder name
    "stages": [],  # the pipeline's order; init_from must name the stage right before `stage`
    "init_from": None,  # stage whose latest checkpoint gives the starting weights (not its optimizer)
    "init_checkpoint": None,  # explicit path or URI of those weights (e.g. s3://...); overrides init_from's folder
    "runs_root": "runs",
    "model": {"preset": "MicroDiT_XL_2", "overrides": OPEN, "latent_channels": 4, "caption_len": 77,
              "caption_dim": 1024},
    "data": {"root": ".", "resolution": 256, "vae_downsample": 8, "streams": STREAMS, "val_streams": STREAMS,
             "caption_drop_prob": 0.1, "num_workers": 8, "seed": 17},
    "diffusion": {"mask_ratio": 0.75, "p_mean": -0.6, "p_std": 1.2, "sigma_data": 0.9},
    "optimizer": {"lr": 2.4e-4, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.1, "moe_lr_scale": 0.5},
    "scheduler": {"name": "constant"},  # plus the options SCHEDULERS lists for that name
    "algorithms": {},  # name -> options (see ALGORITHMS), or null to switch off one a base file enabled
    "train": {"global_batch": 2048, "device_microbatch": 256, "max_duration": "250000ba", "device": "auto",
              "precision": "auto", "parallelism": "auto", "compile": False, "seed": 18, "log_interval": "100ba",
              "progress_bar": True},
    "checkpoint": {"save_folder": None, "save_interval": "1000ba", "keep": 3},
    "eval": {"interval": None, "batches": 8, "batch_size": 32, "seed": 0},
    "samples": {"interval": None, "prompts": [], "steps": 30, "guidance": 5.0, "sampler": "heun", "seed": 0},
    "cost": {"usd_per_device_hour": None, "max_usd": None, "max_device_hours": None, "device_type": None},
}


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file, key, stage or path."""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into a copy of `base`: dicts merge (a dict naming a `name:` replaces), the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and "name" in value:
            out[key] = copy.deepcopy(value)  # a new scheduler name brings its own options: nothing of the old one
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_file(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and merge it over its `base:` chain (paths relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: `base:` chain loops ({' -> '.join(str(p) for p in _seen)})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(load_file(path.parent / base, (*_seen, path)), data)


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply command-line `key.sub=value` overrides; values are parsed as YAML (`0.5`, `null`, `[1, 2]`)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = cfg
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {dotted}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(raw)
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
    """Check `given` against `schema` and return it with defaults filled in."""
    unknown = sorted(set(given) - set(schema))
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(f"unknown recipe key {prefix}{unknown[0]} (allowed here: {', '.join(sorted(schema))})")
    out = {}
    for key, default in schema.items():
        dotted = f"{where}.{key}" if where else key
        value = given.get(key, copy.deepcopy(default) if default not in (OPEN, STREAMS) else None)
        if default == OPEN:
            value = dict(value or {})
        elif default == STREAMS:
            value = _check_streams(value, dotted)
        elif isinstance(default, dict) and not (where == "" and key in ("algorithms", "scheduler")):
            if not isinstance(value, dict):
                raise RecipeError(f"{dotted}: expected a section (mapping), got {value!r}")
            value = _fill(value, default, dotted)
        elif key in given:
            value = _typed(value, default, dotted)
        out[key] = value
    return out


def _typed(value: Any, default: Any, dotted: str) -> Any:
    """Check a scalar against its default's type (YAML 1.1 reads `1e-3` as a string: numeric strings become floats)."""
    if default is None or value is None and not isinstance(default, (bool, int, float)):
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


def validate(cfg: dict) -> dict:
    """Check every key against SCHEMA and the registries; return the recipe with all defaults filled."""
    out = _fill({k: v for k, v in cfg.items() if k != "base"}, SCHEMA, "")
    out.pop("base")
    out["scheduler"] = _check_named(cfg.get("scheduler", SCHEMA["scheduler"]), SCHEDULERS, "scheduler", "scheduler")
    algos = {}
    for name, options in (cfg.get("algorithms") or {}).items():
        if name not in ALGORITHMS:
            raise RecipeError(f"algorithms.{name}: unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
        if options is not None:  # null switches off an algorithm a base file enabled
            algos[name] = _fill(options or {}, ALGORITHMS[name], f"algorithms.{name}")
    out["algorithms"] = algos
    if not out["stage"]:
        raise RecipeError("recipe has no `stage:` name")
    _check_values(out)
    return out


def _check_values(cfg: dict) -> None:
    """Values that no later step would reject with a clear message."""
    t, d = cfg["train"], cfg["data"]
    if d["resolution"] % d["vae_downsample"]:
        raise RecipeError(f"data.resolution {d['resolution']} is not a multiple of data.vae_downsample")
    if not 0.0 <= cfg["diffusion"]["mask_ratio"] < 1.0:
        raise RecipeError(f"diffusion.mask_ratio must be in [0, 1), got {cfg['diffusion']['mask_ratio']}")
    for key in ("precision", "parallelism", "device"):
        allowed = {"precision": ("auto", "fp32", "amp_bf16", "amp_fp16"), "parallelism": ("auto", "fsdp", "ddp",
                   "none"), "device": ("auto", "cpu", "gpu")}[key]
        if t[key] not in allowed:
            raise RecipeError(f"train.{key}: unknown value {t[key]!r} (allowed: {', '.join(allowed)})")
    if cfg["eval"]["interval"] and not d["val_streams"]:
        raise RecipeError("eval.interval is set but data.val_streams is empty: give held-out shards or set "
                          "eval.interval=null")
    if cfg["samples"]["interval"] and not cfg["samples"]["prompts"]:
        raise RecipeError("samples.interval is set but samples.prompts is empty")


def check_stage_order(cfg: dict) -> None:
    """`init_from` must name the stage right before this one in `stages` (none for the first stage)."""
    stage, stages, init = cfg["stage"], cfg["stages"], cfg["init_from"]
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


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a recipe (with its base chain), apply `key.sub=value` overrides, validate and fill defaults."""
    cfg = apply_overrides(load_file(path), list(overrides or []))
    cfg = validate(cfg)
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


def missing_inputs(cfg: dict, init_checkpoint: str | None) -> list[str]:
    """Local inputs that do not exist: stream folders without a remote, and the previous stage's checkpoint."""
    problems = []
    for key in ("streams", "val_streams"):
        for i, s in enumerate(resolve_streams(cfg, key)):
            if s["remote"] is None and not (Path(s["local"]) / "index.json").is_file():
                problems.append(f"data.{key}[{i}]: no MDS index at {Path(s['local']) / 'index.json'}")
    if init_checkpoint is not None and not is_remote(init_checkpoint) and not Path(init_checkpoint).exists():
        problems.append(f"stage {cfg['stage']!r} starts from {cfg['init_from'] or 'init_checkpoint'}, but its "
                        f"checkpoint {init_checkpoint} does not exist (run that stage first)")
    if not cfg["data"]["streams"]:
        problems.append("data.streams is empty")
    return problems
