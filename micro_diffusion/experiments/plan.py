"""From an experiment to its runs: each (variant, seed)'s stages, with the steps its budget buys.

A FLOP budget buys every run the same analytic training FLOPs (the count the cost ledger uses), so a variant that
costs less per sample trains for more steps. `narrow_to` narrows an unmasked network until its FLOPs per sample
equal another variant's (the paper's model-downscaling baseline, Figure 5); `then` spends a share of the budget on
a second stage that starts from the first one's weights (e.g. an unmasked finetune).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cost.estimate import flops_per_sample
from ..recipe import build_network, load_recipe
from .spec import Experiment, Variant


@dataclass
class StagePlan:
    """One training stage of a run: its recipe overrides, steps and FLOPs per sample."""

    overrides: dict[str, Any]  # {dotted recipe key: value}
    steps: int
    flops_per_sample: int


@dataclass
class RunPlan:
    """One (variant, seed): its stages in order, and its network's parameter count."""

    variant: str
    seed: int
    stages: list[StagePlan]
    parameters: int
    batch: int  # global batch of every stage

    @property
    def flops(self) -> int:
        """Analytic training FLOPs of the whole run (every stage's steps x batch x FLOPs per sample)."""
        return sum(s.steps * self.batch * s.flops_per_sample for s in self.stages)

    @property
    def name(self) -> str:
        """Folder name of the run."""
        return f"{self.variant}_s{self.seed}"


def stage_config(exp: Experiment, overrides: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """The base recipe with a variant's overrides (and any extra ones) applied and checked."""
    return load_recipe(exp.base_recipe, {**stage_overrides(exp, overrides), **(extra or {})})


def stage_overrides(exp: Experiment, overrides: dict[str, Any]) -> dict[str, Any]:
    """A variant's overrides, at the experiment's image size."""
    return {"data.resolution": exp.data["size"], **overrides}


def _cost(cfg: dict) -> tuple[int, int]:
    """(FLOPs per sample, parameters) of a recipe's network, built on the meta device."""
    with torch.device("meta"):
        net = build_network(cfg)
    return flops_per_sample(net, cfg), sum(p.numel() for p in net.parameters())


def narrowed(exp: Experiment, variant: Variant) -> dict[str, Any]:
    """The variant's overrides with the backbone and mixer widths scaled until FLOPs per sample match narrow_to's."""
    target, _ = _cost(stage_config(exp, exp.variant(variant.narrow_to).overrides))
    base = stage_config(exp, variant.overrides)["model"]
    head = int(base["overrides"].get("head_dim", 64))
    width = int(base["overrides"].get("width", 1024))
    mixer = int(base["overrides"].get("patch_mixer_width", width))
    best: tuple[float, dict[str, Any]] | None = None
    for w in range(2 * head, width + 1, head):  # widths in steps of the head size keep whole heads
        mw = max(head, round(mixer * w / width / head) * head)
        trial = {**variant.overrides, "model.overrides.width": w, "model.overrides.patch_mixer_width": mw}
        gap = abs(_cost(stage_config(exp, trial))[0] / target - 1)
        if best is None or gap < best[0]:
            best = (gap, trial)
    return best[1]


def _steps(budget: dict[str, float], share: float, flops: int, batch: int) -> int:
    if "steps" in budget:
        return max(1, round(budget["steps"] * share))
    return max(1, round(budget["flops"] * share / (flops * batch)))


def plan_runs(exp: Experiment, seeds: list[int] | None = None) -> list[RunPlan]:
    """Every (variant, seed) of the experiment with its stages and steps."""
    out = []
    for variant in exp.variants:
        overrides = narrowed(exp, variant) if variant.narrow_to else dict(variant.overrides)
        cfg = stage_config(exp, overrides)
        flops, params = _cost(cfg)
        batch = int(cfg["train"]["global_batch"])
        share = 1 - variant.then["fraction"] if variant.then else 1.0
        stages = [(overrides, _steps(exp.budget, share, flops, batch), flops)]
        if variant.then:
            second = {**overrides, **variant.then.get("overrides", {})}
            f2, _ = _cost(stage_config(exp, second))
            stages.append((second, _steps(exp.budget, variant.then["fraction"], f2, batch), f2))
        for seed in seeds if seeds is not None else exp.seeds:
            seeded = {"train.seed": seed, "data.seed": seed}  # weights, noise, masks and data order
            out.append(RunPlan(variant.name, seed, [StagePlan({**stage_overrides(exp, o), **seeded}, s, f)
                                                    for o, s, f in stages], params, batch))
    return out


def stage_dirs(root: Path, run: RunPlan) -> list[Path]:
    """Run folders of a run's stages: runs/<variant>_s<seed>/stage<k>."""
    return [root / "runs" / run.name / f"stage{k}" for k in range(len(run.stages))]
