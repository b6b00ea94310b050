"""Sampling efficiency across sizes: equal-steps plans, sampling FLOPs against FlopCounterMode, best-guidance envelopes
and claims at common budgets on hand-made numbers, and the whole chain through `make sizes QUICK=1`."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cost import render
from test_demo import make
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.cost.flops import sample_flops_per_image
from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import SamplingSettings, generate_latents, network_evals
from micro_diffusion.eval.envelope import best_guidance, common_range, crossover, envelope, interpolate
from micro_diffusion.experiments.plan import plan_runs
from micro_diffusion.experiments.report import judge
from micro_diffusion.experiments.spec import load_experiment
from micro_diffusion.models import create_dit

REPO = Path(__file__).resolve().parents[1]
SIZES = REPO / "recipes" / "experiments" / "sizes.yaml"


def test_every_size_trains_the_same_steps_and_parameters_span_8x():
    spec = load_experiment(SIZES)
    plans = plan_runs(spec, [0])
    assert len(plans) == 4 and {p.stages[0].steps for p in plans} == {spec.budget["steps"]}
    params = sorted(p.parameters for p in plans)
    assert params[-1] / params[0] >= 8 and len(set(params)) == 4
    small = load_experiment(SIZES, quick=True)
    assert {p.stages[0].steps for p in plan_runs(small)} == {small.budget["steps"]} != {spec.budget["steps"]}


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "stochastic", "consistency"])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.slow
def test_sampling_flops_match_flop_counter(sampler, steps):
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=24, width=64, depth=2, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=32).eval()
    guidance = 1.0 if sampler == "consistency" else 3.0  # a student samples unguided
    cond, null = torch.randn(2, 5, 24), torch.zeros(5, 24)
    settings = SamplingSettings(steps=steps, guidance=guidance, sampler=sampler)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        generate_latents(EDMPrecond(net, 1.0), cond, null, settings, [0, 1], (net.in_channels, 8, 8))
    ours = 2 * sample_flops_per_image(net, 8, 5, steps=steps, sampler=sampler, guidance=guidance != 1.0)
    measured = counter.get_total_flops()
    assert abs(ours - measured) / measured < 0.02, (sampler, steps, ours, measured)


def points(cost: float, fid_of_evals, best_g: float, samplers=("heun",), noise: float = 0.0) -> list[dict]:
    """Sweep points of a made-up model: FID a function of its evaluations, worse away from its best guidance."""
    out = []
    for sampler in samplers:
        for steps in (1, 2, 4, 8, 16, 32, 64):
            evals = network_evals(steps, "euler")  # one evaluation a step: FLOPs = steps x 2 (guidance) x cost
            for g in (2.0, 4.0, 8.0):
                fid = fid_of_evals(sampler, evals) + abs(math.log2(g / best_g)) * 5 + noise
                out.append({"sampler": sampler, "steps": steps, "guidance": g, "flops_per_image": 2 * evals * cost,
                            "fid": fid, "geneval": {"overall": 1 / fid}})
    return out


def small(sampler, n):
    return 50 + 100 / n


def large(sampler, n):  # better per evaluation, 10x the cost; on euler never better than the small one
    return 10 + 100 / n if sampler == "heun" else 60 + 300 / n


def test_best_guidance_envelope_and_log_flop_interpolation():
    pts = points(1.0, small, best_g=4.0)
    chosen = best_guidance(pts, "fid", "heun")
    assert [p["guidance"] for p in chosen] == [4.0] * 7 and [p["steps"] for p in chosen] == [1, 2, 4, 8, 16, 32, 64]
    flops, fid = envelope(pts, "fid", "heun")
    assert list(flops) == [2, 4, 8, 16, 32, 64, 128] and fid[0] == 150
    # halfway in log-FLOPs between 2 and 4 FLOPs is sqrt(8): the mean of the two values; outside the curve: nan
    assert interpolate((flops, fid), [8 ** 0.5])[0] == pytest.approx((150 + 100) / 2)
    assert np.isnan(interpolate((flops, fid), [1.0, 200.0])).all()
    assert best_guidance(points(1.0, small, best_g=8.0), "geneval", "heun")[0]["guidance"] == 8.0  # higher is better
    big = envelope(points(10.0, large, best_g=2.0), "fid", "heun")
    assert common_range([(flops, fid), big]) == (20.0, 128.0)
    assert common_range([(flops[:2], fid[:2]), big]) is None
    # small(n) = large(n / 10) at n = 22.5 evaluations, i.e. 45 FLOPs; the log grid finds it up to interpolation
    assert 32 <= crossover((flops, fid), big, "fid") <= 64
    assert crossover((flops, fid), envelope(points(10.0, large, 2.0, ("euler",)), "fid", "euler"), "fid") is None


def test_budget_claims_on_hand_made_sweeps():
    exp = load_experiment(SIZES)
    rows = []
    for name, cost, fn, g in (("w64", 1.0, small, 4.0), ("w256", 10.0, large, 2.0)):
        for seed, noise in ((0, -0.5), (1, 0.5)):
            rows.append({"name": name, "seed": seed, "parameters": int(cost), "metrics": {
                "sweep": points(cost, fn, g, ("heun", "euler"), noise)}})
    claims = {c["name"]: c for c in judge(exp, rows)}
    low = claims["smallest beats largest at the lowest budget (FID) [heun]"]
    assert low["flops_per_image"] == 20.0 and low["verdict"] == "reproduced"  # n=10 (interpolated) vs n=1: 110
    high = claims["largest beats smallest at the highest budget (FID) [heun]"]
    assert high["flops_per_image"] == 128.0 and high["verdict"] == "reproduced"
    assert claims["largest beats smallest at the highest budget (FID) [euler]"]["verdict"] == "not reproduced"
    assert claims["largest beats smallest at the highest budget (GenEval) [heun]"]["verdict"] == "reproduced"
    assert len(claims) == 8  # 4 claims x the 2 samplers these sweeps hold


@pytest.fixture(scope="module")
def quick_sizes(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    make("sizes", "QUICK=1", f"EXP_OUT={out}")
    return out / "sizes"


@pytest.mark.slow
def test_quick_sizes_sweeps_every_run_and_judges_at_common_budgets(quick_sizes):
    exp = load_experiment(SIZES, quick=True)
    results = json.loads((quick_sizes / "results.json").read_text())
    grid = exp.eval["sweep"]
    n_points = len(grid["samplers"]) * len(grid["steps"]) * len(grid["guidances"])
    for row in results["variants"]:
        sweep = row["metrics"]["sweep"]
        assert len(sweep) == n_points and all(math.isfinite(p["fid"]) and p["images_per_s"] > 0 for p in sweep)
        s = exp.eval["sampling"]  # the metrics table's point is the grid's point of the fixed settings
        fixed = next(p for p in sweep if (p["sampler"], p["steps"], p["guidance"]) == (s["sampler"], s["steps"],
                                                                                      s["guidance"]))
        assert fixed["fid"] == row["metrics"]["fid"] and fixed["geneval"] == row["metrics"]["geneval"]
    budgets = {c["budget"]: c["flops_per_image"] for c in results["claims"]}
    assert set(budgets) == {"lowest", "highest"} and 0 < budgets["lowest"] < budgets["highest"]
    assert len(results["claims"]) == 4 * len(grid["samplers"])
    assert {c["verdict"] for c in results["claims"]} == {"inconclusive"}  # one seed in quick mode
    assert {(c["sampler"], c["metric"]) for c in results["crossovers"]} == \
        {(s, m) for s in grid["samplers"] for m in ("fid", "geneval")}
    dom, console = render(quick_sizes / "report.html")
    assert console == [] and 'id="crossover-table"' in dom and "sweep_sizes" in dom


@pytest.mark.slow
def test_eval_sweep_alone_on_the_compositional_set(quick_sizes, tmp_path):
    model = quick_sizes / "runs" / "w64_s0" / "eval" / "model"
    data = quick_sizes / "data"
    cmd = [sys.executable, "-m", "micro_diffusion.cli", "eval", "sweep", str(model), "--out",
           str(tmp_path), "--scenes", str(data / "images" / "val"), "--geneval", str(data / "prompts"), "--num", "4",
           "--presets", "euler:1", "dpmpp_2m:2", "--guidances", "2", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [(p["sampler"], p["steps"], p["guidance"]) for p in result["points"]] == \
        [("euler", 1, 2.0), ("euler", 1, 4.0), ("dpmpp_2m", 2, 2.0), ("dpmpp_2m", 2, 4.0)]
    assert all("geneval" in p and p["relative_cost"] > 0 for p in result["points"])
    assert (tmp_path / "sweep.png").stat().st_size > 1000
