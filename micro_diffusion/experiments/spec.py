"""Experiment files: one schema (docs/interfaces.md, "Experiments"), checked key by key like recipes.

    base_recipe: ../demo_masked.yaml           # the recipe every run starts from (path relative to this file)
    data: {size: 64, count: 4000, heldout: 256, seed: 0}       # compositional scenes, generated once
    budget: {flops: 1.0e15}                    # analytic training FLOPs of every run (or {steps: N})
    seeds: [0, 1]
    eval: {...}                                # EVAL below: validation points and noise grid, sampling, FID, GenEval
    variants:
      - {name: deferred_75, overrides: {diffusion.mask_ratio: 0.75}}
      - {name: downscaled, overrides: {diffusion.mask_ratio: 0.0}, narrow_to: deferred_75}
      - {name: deferred_75_ft, overrides: {...}, then: {fraction: 0.1, overrides: {diffusion.mask_ratio: 0.0}}}
      - {name: fluid, overrides: {model.family: fluid, ...}, sampling: {sampler: fluid, steps: 16, ...}}
                                               # sampling: this variant's fixed sampling point (its family's sampler)
    claims:
      - {name: ..., kind: beats | within, a: VARIANT, b: VARIANT, metric: val_loss | fid | geneval}
      - {name: ..., kind: speedup, a: VARIANT, b: VARIANT, metric: val_loss | geneval, factor: 2.0}
                                               # a reaches b's final value with at most 1/factor of b's FLOPs
      - {..., metric: fid | geneval, budget: lowest | highest, sampler: NAME | each}
                                               # on the sweep: each run's best-guidance curve at the lowest or highest
                                               # sampling budget all runs cover (one claim a sampler for `each`)
    loggers: {wandb: {project: ...}}           # experiment trackers for every run, as a recipe's loggers: block
    quick: {data: {...}, budget: {...}, eval: {...}, seeds: [...], overrides: {...}, variants: [NAME, ...],
            sampling: {VARIANT: {...}}}        # what --quick changes; variants keeps a subset (and their claims);
                                               # sampling replaces variants' own sampling points
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..diffusion.sampling import SamplingSettings, diffusion_samplers
from ..errors import UsageError
from ..families import FAMILIES
from ..recipe import RecipeError, check_loggers, find_recipe
from .verdict import LOWER_IS_BETTER

# the demo's encoders: its small VAE (shipped with the package) and the packaged MiniLM, 16 caption tokens
DEMO_VAE = str(Path(__file__).resolve().parents[1] / "demo" / "assets" / "vae")
DATA = {"size": 64, "count": 4000, "heldout": 256, "seed": 0, "vae": DEMO_VAE, "text_encoder": "minilm",
        "caption_len": 16}
EVAL = {
    "val_points": 10,  # validation losses logged over each run's budget
    "val_sigmas": 12,  # the fixed grid of noise levels (quantiles of the training log-normal)
    "val_samples": 256,  # held-out latents of the validation loss
    "sampling": {"sampler": "heun", "steps": 20, "guidance": 4.0},  # for FID and the GenEval-style score
    "fid_images": 256,
    "geneval_prompts": 96,
    "images_per_prompt": 2,
    "sweep": None,  # {samplers, steps, guidances}: every run also sampled on that grid (SWEEP_KEYS)
    "geneval_points": 1,  # GenEval-style scores along training, the last at the end (1: at the end only)
    "point_prompts": None,  # held-out prompts (one image each) scored at every point (None: all geneval_prompts)
}
SWEEP_KEYS = {"samplers", "steps", "guidances"}
CLAIM_AT = {"budget": ("lowest", "highest"), "sampler": None}  # optional claim keys: judged on the sweep
CLAIM_KINDS = ("beats", "within", "speedup")
KEYS = {"base_recipe", "data", "budget", "seeds", "eval", "variants", "claims", "quick", "loggers"}
VARIANT_KEYS = {"name", "overrides", "narrow_to", "then", "sampling"}
SAMPLING_KEYS = {"sampler", "steps", "guidance", "temperature", "head_steps"}


@dataclass
class Variant:
    """One recipe variant: overrides of the base recipe, optionally narrowed, optionally followed by a second stage."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    narrow_to: str | None = None  # narrow the network until its FLOPs per sample equal this variant's
    then: dict[str, Any] | None = None  # {fraction: share of the budget, overrides: {...}}: a finetune stage
    sampling: dict[str, Any] | None = None  # its fixed sampling point instead of eval.sampling (another family's)


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    path: Path
    base_recipe: Path
    data: dict[str, Any]
    budget: dict[str, float]
    seeds: list[int]
    eval: dict[str, Any]
    variants: list[Variant]
    claims: list[dict[str, str]]
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)  # trackers of every run (recipe.LOGGERS)

    def variant(self, name: str) -> Variant:
        """The variant of that name."""
        return next(v for v in self.variants if v.name == name)


def _section(given: Any, schema: dict, where: str) -> dict:
    if not isinstance(given, dict):
        raise RecipeError(f"{where}: expected a mapping, got {given!r}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(schema))})")
    out = copy.deepcopy(schema)
    for key, value in given.items():
        out[key] = _section(value, schema[key], f"{where}.{key}") if isinstance(schema[key], dict) else value
    return out


def _variant(raw: Any, where: str) -> Variant:
    if not isinstance(raw, dict) or "name" not in raw:
        raise RecipeError(f"{where}: a variant is a mapping with a name, got {raw!r}")
    unknown = sorted(set(raw) - VARIANT_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(VARIANT_KEYS))})")
    then = raw.get("then")
    if then is not None and (set(then) - {"fraction", "overrides"} or not 0 < then.get("fraction", 0) < 1):
        raise RecipeError(f"{where}.then: needs a fraction in (0, 1) and overrides, got {then!r}")
    sampling = raw.get("sampling")
    if sampling is not None:
        _check_sampling(sampling, f"{where}.sampling")
    return Variant(str(raw["name"]), dict(raw.get("overrides") or {}), raw.get("narrow_to"), then, sampling)


def _check_sampling(sampling: dict[str, Any], where: str) -> None:
    """A fixed sampling point, as a recipe's samples: section is checked (a bad one would fail after training)."""
    if not isinstance(sampling, dict) or not {"sampler", "steps", "guidance"} <= set(sampling) <= SAMPLING_KEYS:
        raise RecipeError(f"{where}: needs sampler, steps, guidance (and for the fluid sampler temperature, "
                          f"head_steps), got {sampling!r}")
    steps, guidance = sampling["steps"], sampling["guidance"]
    allowed = sorted(n for fam in FAMILIES for n in diffusion_samplers(fam))
    if sampling["sampler"] not in allowed:
        raise RecipeError(f"{where}.sampler: unknown sampler {sampling['sampler']!r} (allowed: {', '.join(allowed)})")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise RecipeError(f"{where}.steps: must be a positive integer, got {steps!r}")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or guidance < 1:
        raise RecipeError(f"{where}.guidance: must be a number >= 1, got {guidance!r}")
    try:
        SamplingSettings(**sampling)
    except UsageError as err:
        raise RecipeError(f"{where}: {err}") from err


def _check_sweep(sweep: Any, sampling: dict[str, Any], where: str) -> dict[str, list] | None:
    """The sweep grid: known diffusion samplers, positive steps, guidance scales; it holds the fixed sampling point."""
    if sweep is None:
        return None
    if not isinstance(sweep, dict) or set(sweep) != SWEEP_KEYS or not all(isinstance(v, list) and v
                                                                          for v in sweep.values()):
        raise RecipeError(f"{where}: needs non-empty lists samplers, steps, guidances; got {sweep!r}")
    for sampler in sweep["samplers"]:
        if sampler not in diffusion_samplers():
            raise RecipeError(f"{where}.samplers: {sampler!r} is not a diffusion sampler (one of "
                              f"{', '.join(diffusion_samplers())}); experiments train "
                              "diffusion models, a consistency student comes from micro-diffusion distill")
    if any(not isinstance(n, int) or n < 1 for n in sweep["steps"]):
        raise RecipeError(f"{where}.steps: positive integers, got {sweep['steps']!r}")
    point = (sampling["sampler"], sampling["steps"], float(sampling["guidance"]))
    if point[0] not in sweep["samplers"] or point[1] not in sweep["steps"] or \
            point[2] not in [float(g) for g in sweep["guidances"]]:
        raise RecipeError(f"{where}: the fixed sampling point {point} (eval.sampling) must be on the grid, whose "
                          "images then give every run's FID and GenEval-style score")
    return {"samplers": list(sweep["samplers"]), "steps": [int(n) for n in sweep["steps"]],
            "guidances": [float(g) for g in sweep["guidances"]]}


def _check_speedup(c: dict, evaluation: dict, at: str) -> None:
    """A speed-up claim: a factor above 0, on a metric measured along training (GenEval-style needs its points)."""
    factor = c.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise RecipeError(f"{at}.factor: a speedup claim needs a positive factor, got {factor!r}")
    if c["metric"] == "fid" or (c["metric"] == "geneval" and evaluation["geneval_points"] < 2):
        raise RecipeError(f"{at}: a speedup claim needs its metric along training: val_loss, or geneval with "
                          f"eval.geneval_points >= 2; got {c['metric']!r} with geneval_points "
                          f"{evaluation['geneval_points']}")


def _check_claims(claims: list, names: set[str], evaluation: dict, where: str) -> list[dict[str, str]]:
    out, sweep = [], evaluation["sweep"]
    for i, c in enumerate(claims):
        at = f"{where}.claims[{i}]"
        extra = {"factor"} if isinstance(c, dict) and c.get("kind") == "speedup" else set(CLAIM_AT)
        if not {"name", "kind", "a", "b", "metric"} <= set(c) <= {"name", "kind", "a", "b", "metric", *extra}:
            raise RecipeError(f"{at}: needs name, kind, a, b, metric (on the sweep also budget and sampler; a "
                              f"speedup claim also factor); got {sorted(c)}")
        if c["kind"] not in CLAIM_KINDS or c["metric"] not in LOWER_IS_BETTER:
            raise RecipeError(f"{at}: kind must be one of {', '.join(CLAIM_KINDS)}, metric one of "
                              f"{sorted(LOWER_IS_BETTER)}; got {c['kind']!r}, {c['metric']!r}")
        for side in ("a", "b"):
            if c[side] not in names:
                raise RecipeError(f"{at}.{side}: no variant {c[side]!r} (variants: {sorted(names)})")
        if c["kind"] == "speedup":
            _check_speedup(c, evaluation, at)
        if set(c) & set(CLAIM_AT):
            if set(CLAIM_AT) - set(c) or sweep is None or c["metric"] == "val_loss":
                raise RecipeError(f"{at}: a claim at a sampling budget needs budget and sampler, an eval.sweep and "
                                  f"metric fid or geneval; got {c!r}")
            if c["budget"] not in CLAIM_AT["budget"] or c["sampler"] not in [*sweep["samplers"], "each"]:
                raise RecipeError(f"{at}: budget is lowest or highest, sampler one of the sweep's "
                                  f"{sweep['samplers']} or each; got {c['budget']!r}, {c['sampler']!r}")
        out.append(dict(c))
    return out


def _check_points(evaluation: dict, where: str) -> None:
    """geneval_points a positive integer; point_prompts none, or between 1 and geneval_prompts."""
    n, k = evaluation["geneval_points"], evaluation["point_prompts"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RecipeError(f"{where}.geneval_points: a positive integer, got {n!r}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= evaluation["geneval_prompts"]):
        raise RecipeError(f"{where}.point_prompts: null or an integer from 1 to geneval_prompts "
                          f"({evaluation['geneval_prompts']}), got {k!r}")


def load_experiment(path: str | Path, quick: bool = False) -> Experiment:
    """Read and check an experiment file; quick=True applies its `quick:` section (a toy size of the same chain)."""
    path = find_recipe(path)  # relative to the current folder, else to the repository's recipes/
    if not path.is_file():
        raise RecipeError(f"experiment file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})")
    missing = sorted({"base_recipe", "budget", "variants"} - set(raw))
    if missing:
        raise RecipeError(f"{where}: missing key {missing[0]!r}")
    small = raw.get("quick") or {}
    if quick:
        raw = {**raw, **{k: {**(raw.get(k) or {}), **v} for k, v in small.items() if k in ("data", "budget", "eval")}}
        if "seeds" in small:
            raw["seeds"] = small["seeds"]
    budget = raw["budget"]
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("flops", "steps"):
        raise RecipeError(f"{where}.budget: give exactly one of flops or steps, got {budget!r}")
    variants = [_variant(v, f"{where}.variants[{i}]") for i, v in enumerate(raw["variants"])]
    claims = raw.get("claims", [])
    if quick and small.get("variants"):
        kept = set(small["variants"])
        missing_names = sorted(kept - {v.name for v in variants})
        if missing_names:
            raise RecipeError(f"{where}.quick.variants: no variant {missing_names[0]!r}")
        variants = [v for v in variants if v.name in kept]
        claims = [c for c in claims if isinstance(c, dict) and c.get("a") in kept and c.get("b") in kept]
    extra = dict(small.get("overrides") or {}) if quick else {}
    points = dict(small.get("sampling") or {}) if quick else {}
    unknown_points = sorted(set(points) - {v.name for v in variants if v.sampling is not None})
    if unknown_points:
        raise RecipeError(f"{where}.quick.sampling: {unknown_points[0]!r} is no variant with its own sampling")
    for v in variants:
        v.overrides = {**v.overrides, **extra}
        if v.name in points:
            _check_sampling(points[v.name], f"{where}.quick.sampling.{v.name}")
            v.sampling = dict(points[v.name])
    names = {v.name for v in variants}
    if len(names) != len(variants):
        raise RecipeError(f"{where}.variants: names must differ, got {[v.name for v in variants]}")
    for v in variants:
        if v.narrow_to is not None and v.narrow_to not in names:
            raise RecipeError(f"{where}: variant {v.name} narrows to unknown variant {v.narrow_to!r}")
    evaluation = _section(raw.get("eval", {}), EVAL, f"{where}.eval")
    _check_sampling(evaluation["sampling"], f"{where}.eval.sampling")
    _check_points(evaluation, f"{where}.eval")
    evaluation["sweep"] = _check_sweep(evaluation["sweep"], evaluation["sampling"], f"{where}.eval.sweep")
    own = [v.name for v in variants if v.sampling is not None]
    if own and evaluation["sweep"] is not None:
        raise RecipeError(f"{where}: variants {own} sample at their own point, which the eval.sweep grid does not "
                          "hold: drop eval.sweep or their sampling")
    return Experiment(name=path.stem, path=path, base_recipe=(path.parent / raw["base_recipe"]).resolve(),
                      data=_section(raw.get("data", {}), DATA, f"{where}.data"),
                      budget={k: float(v) for k, v in budget.items()}, seeds=[int(s) for s in raw.get("seeds", [0])],
                      eval=evaluation, variants=variants,
                      claims=_check_claims(claims, names, evaluation, where),
                      loggers=check_loggers(raw.get("loggers"), f"{where}.loggers"))


def only_variants(exp: Experiment, names: list[str]) -> Experiment:
    """The experiment cut to some variants (and the claims between them); an unknown name is an error naming it."""
    known = [v.name for v in exp.variants]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise RecipeError(f"{exp.path}: no variant {unknown[0]!r} (variants: {', '.join(known)})")
    kept = [v for v in exp.variants if v.name in names]
    missing = {v.narrow_to for v in kept if v.narrow_to} - set(names)
    if missing:
        raise RecipeError(f"{exp.path}: a kept variant narrows to {sorted(missing)[0]!r}: keep it too")
    claims = [c for c in exp.claims if c["a"] in names and c["b"] in names]
    return replace(exp, variants=kept, claims=claims)
