"""The routing experiment (recipes/experiments/routing.yaml): its fixed design, the convergence speed-up claim
(reach_flops, speedup_verdict), the GenEval-style points along training, and `make routing QUICK=1`."""
import json
import math
from pathlib import Path

import pytest
import torch
from test_experiments import assert_file_error
from tiny_runs import make

from micro_diffusion.cost.flops import forward_flops_breakdown
from micro_diffusion.experiments.plan import plan_runs
from micro_diffusion.experiments.runner import point_steps
from micro_diffusion.experiments.spec import load_experiment
from micro_diffusion.experiments.verdict import reach_flops, speedup_verdict
from micro_diffusion.models import create_dit
from micro_diffusion.recipe import RecipeError, build_network, load_recipe

REPO = Path(__file__).resolve().parents[1]
ROUTING = REPO / "recipes" / "experiments" / "routing.yaml"
MASKING = REPO / "recipes" / "experiments" / "masking.yaml"


def mixer_share(net, latent: int, caption_len: int) -> float:
    """The patch-mixer's share of a 75%-masked training forward."""
    parts = forward_flops_breakdown(net, latent, caption_len, 0.75, training=True)
    return parts["mixer"] / sum(parts.values())


def test_the_design_keeps_xl_proportions_budget_seeds_and_points():
    exp = load_experiment(ROUTING)
    cfg = load_recipe(exp.base_recipe, {"data.resolution": exp.data["size"]})
    with torch.device("meta"):
        net = build_network(cfg)
        xl = create_dit("MicroDiT_XL_2", latent_size=32, in_channels=4, caption_dim=1024)
    assert len(net.blocks) >= 8
    latent = exp.data["size"] // cfg["data"]["vae_downsample"]
    assert abs(mixer_share(net, latent, cfg["model"]["caption_len"]) - mixer_share(xl, 32, 77)) <= 0.05
    assert exp.budget["flops"] >= 3 * load_experiment(MASKING).budget["flops"]
    assert len(exp.seeds) >= 3 and exp.eval["geneval_points"] >= 5
    plans = {p.variant: p for p in plan_runs(exp, [0])}
    assert {"paper", "no_masking", "tread", "sprint"} <= set(plans)
    for p in plans.values():  # equal FLOPs: within half a step of every stage
        assert abs(p.flops - exp.budget["flops"]) <= sum(0.5 * p.batch * s.flops_per_sample for s in p.stages)
    tread = plans["tread"].stages[0].overrides
    assert tread["model.overrides.routes"] == [[1, 6, 0.5]] and tread["model.overrides.patch_mixer_depth"] == 0
    assert [s.overrides["diffusion.mask_ratio"] for s in plans["sprint"].stages] == [0.75, 0.0]


@pytest.mark.parametrize("values,target,lower,want", [
    ([0.2, 0.6], 0.4, False, math.sqrt(1e9 * 1e10)),  # halfway in value: halfway in log FLOPs
    ([0.5, 0.6], 0.4, False, 1e9),                    # the first point already reaches it
    ([0.2, 0.3], 0.4, False, None),                   # never
    ([1.0, 0.5], 0.75, True, math.sqrt(1e9 * 1e10)),  # lower is better (the validation loss)
    ([1.0, 0.5], 0.4, True, None),
])
def test_reach_flops_interpolates_in_log_flops(values, target, lower, want):
    got = reach_flops([1e9, 1e10], values, target, lower)
    assert got == want if want is None else got == pytest.approx(want, rel=1e-9)


def test_speedup_verdict_follows_the_rule():
    flops = [1e9, 1e10, 1e11]

    def curves(*reach_at):  # each seed's curve reaches 0.5 exactly at its point index
        return [(flops, [0.6 if i > k else 0.5 if i == k else 0.1 for i in range(3)]) for k in reach_at]

    fast = speedup_verdict("geneval", curves(1, 1, 1), [0.5, 0.5], 1e11, 2.0)
    assert fast["speedups"] == pytest.approx([10.0] * 3) and fast["target"] == 0.5
    spread = speedup_verdict("geneval", [(flops, [0.1, 0.5 + d, 0.7]) for d in (0.0, 0.05, 0.1)], [0.5], 1e11, 2.0)
    assert spread["verdict"] == "reproduced" and spread["a_mean"] > 2
    noisy = speedup_verdict("geneval", curves(0, 1, 2), [0.5], 1e11, 2.0)  # 100x, 10x, 1x: 2 se spans log 2
    assert noisy["verdict"] == "inconclusive" and noisy["a_mean"] == pytest.approx(10.0)
    slow = speedup_verdict("geneval", [(flops, [0.1, 0.2, 0.5 + d]) for d in (0.0, 0.05, 0.1)], [0.5], 1e11, 2.0)
    assert slow["verdict"] == "not reproduced" and 1.0 <= slow["a_mean"] < 2
    never = speedup_verdict("geneval", [*curves(1, 1), (flops, [0.1, 0.2, 0.3])], [0.5], 1e11, 2.0)
    assert never["verdict"] == "not reproduced" and never["speedups"][2] is None
    assert speedup_verdict("geneval", curves(1), [0.5], 1e11, 2.0)["verdict"] == "inconclusive"  # one seed


def test_points_cover_the_run_and_end_at_each_stage():
    exp = load_experiment(ROUTING)
    for p in plan_runs(exp, [0]):
        steps = point_steps(p, exp.eval["geneval_points"])
        assert sum(map(len, steps)) == exp.eval["geneval_points"]
        assert [s[-1] for s in steps] == [s.steps for s in p.stages]
        assert all(a < b for s in steps for a, b in zip(s, s[1:], strict=False))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["claims"][4].pop("factor"), "positive factor"),
    (lambda d: d["claims"][4].update(metric="fid"), "needs its metric along training"),
    (lambda d: d["eval"].update(geneval_points=1), "geneval_points >= 2"),
    (lambda d: d["eval"].update(geneval_points=0), "geneval_points: a positive integer"),
    (lambda d: d["eval"].update(point_prompts=500), "point_prompts: null or an integer"),
    (lambda d: d["claims"][0].update(factor=2.0), r"claims\[0\]: needs name, kind"),
    (lambda d: d["claims"][0].update(kind="faster"), "kind must be one of beats, within, speedup"),
])
def test_speedup_and_point_errors_name_the_key(tmp_path, edit, match):
    assert_file_error(tmp_path, ROUTING, "demo_routing.yaml", edit, match)


@pytest.mark.slow
def test_quick_routing_scores_points_along_training_and_judges_the_speedup(tmp_path):
    """`make routing QUICK=1`: every variant at a toy size, the GenEval-style score at each point, the convergence
    table and the speed-up claim in the report."""
    make("routing", "QUICK=1", f"EXP_OUT={tmp_path}")
    exp, root = load_experiment(ROUTING, quick=True), tmp_path / "routing"
    results = json.loads((root / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == [v.name for v in exp.variants]
    for row, plan in zip(results["variants"], plan_runs(exp), strict=True):
        curve = row["geneval_curve"]
        assert len(curve) == exp.eval["geneval_points"] and curve[-1]["flops"] == plan.flops
        assert all(0 <= p["geneval"] <= 1 for p in curve)
        assert all(a["flops"] < b["flops"] for a, b in zip(curve, curve[1:], strict=False))
        for p in curve:
            shown = Path(row["run_dir"]) / "eval" / "curve" / f"stage{p['stage']}_ba{p['step']}" / "geneval"
            assert len(list(shown.glob("*/samples/*.png"))) == exp.eval["point_prompts"]
    speed = next(c for c in results["claims"] if c["kind"] == "speedup")
    assert speed["b_mean"] == 2.0 and speed["verdict"] in ("inconclusive", "not reproduced")  # one seed
    summary = (root / "summary.md").read_text()
    assert "| variant | metric | target (paper final) |" in summary and "| tread | geneval |" in summary
    assert (root / "geneval_flops.png").stat().st_size > 1000


def test_only_variants_keeps_their_claims_and_names_an_unknown_one():
    from micro_diffusion.experiments.spec import only_variants

    exp = only_variants(load_experiment(ROUTING), ["paper", "tread"])
    assert [v.name for v in exp.variants] == ["paper", "tread"]
    assert exp.claims and all({c["a"], c["b"]} <= {"paper", "tread"} for c in exp.claims)
    assert {p.variant for p in plan_runs(exp, [0])} == {"paper", "tread"}
    with pytest.raises(RecipeError, match="no variant 'treadd'"):
        only_variants(load_experiment(ROUTING), ["treadd"])
