"""Experiments: equal-FLOP plans, the verdict rule, experiment-file errors, and the whole chain through
`make ablation QUICK=1` / `make ablation-arch QUICK=1` (resumed, reported, rendered in Chromium)."""
import json
import math
from pathlib import Path

import pytest
from test_cost import render
from tiny_runs import make

from micro_diffusion.experiments.plan import plan_runs, stage_dirs
from micro_diffusion.experiments.spec import load_experiment
from micro_diffusion.experiments.verdict import verdict
from micro_diffusion.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]
MASKING = REPO / "recipes" / "experiments" / "masking.yaml"
ARCH = REPO / "recipes" / "experiments" / "architecture.yaml"
SIZES = REPO / "recipes" / "experiments" / "sizes.yaml"
FAMILIES = REPO / "recipes" / "experiments" / "families.yaml"


@pytest.mark.parametrize("path", [MASKING, ARCH, FAMILIES])
def test_every_run_spends_the_same_flops(path):
    exp = load_experiment(path)
    plans = plan_runs(exp, [0])
    budget = exp.budget["flops"]
    for p in plans:  # steps round to whole numbers: every run lands within half a step of each stage of the budget
        slack = sum(0.5 * p.batch * s.flops_per_sample for s in p.stages)
        assert abs(p.flops - budget) <= slack, (p.name, p.flops, budget)
    by_name = {p.variant: p for p in plans}
    if path == MASKING:
        # cheaper per sample buys more steps: naive 75% > deferred 75% > no masking
        steps = {n: sum(s.steps for s in p.stages) for n, p in by_name.items()}
        assert steps["naive_75"] > steps["deferred_75"] > steps["no_masking"]
        ft = by_name["deferred_75_finetune"].stages
        assert len(ft) == 2 and ft[0].overrides["diffusion.mask_ratio"] == 0.75
        assert ft[1].overrides["diffusion.mask_ratio"] == 0.0
        assert ft[1].steps * ft[1].flops_per_sample == pytest.approx(0.1 * budget / 32, rel=0.02)
        down, deferred = by_name["downscaled"], by_name["deferred_75"]
        assert down.parameters < deferred.parameters
        assert abs(down.stages[0].flops_per_sample / deferred.stages[0].flops_per_sample - 1) < 0.25


def test_seeds_vary_weights_noise_and_data_order():
    plans = plan_runs(load_experiment(MASKING), [3, 4])
    assert {p.seed for p in plans} == {3, 4}
    assert plans[0].stages[0].overrides["train.seed"] == 3 and plans[0].stages[0].overrides["data.seed"] == 3
    assert stage_dirs(Path("x"), plans[0])[0] == Path("x/runs/no_masking_s3/stage0")


@pytest.mark.parametrize("kind,a,b,want", [
    ("beats", [1.0, 1.1], [2.0, 2.1], "reproduced"),        # val_loss: lower is better, a far ahead
    ("beats", [2.0, 2.1], [1.0, 1.1], "not reproduced"),
    ("beats", [1.0, 2.0], [1.2, 2.2], "inconclusive"),      # gap 0.2, 2 se = 1.41
    ("within", [1.00, 1.01], [1.005, 1.015], "reproduced"),  # gap 0.005 within 2 se and 5%
    ("within", [1.0, 1.01], [2.0, 2.01], "not reproduced"),
    ("within", [1.0, 1.6], [1.5, 2.1], "inconclusive"),      # |gap| 0.5 <= 2 se 0.85 but above 5% of b
])
def test_verdict_rule(kind, a, b, want):
    out = verdict(kind, "val_loss", a, b)
    assert out["verdict"] == want, out
    assert out["gap"] == pytest.approx(sum(b) / 2 - sum(a) / 2)


def test_higher_is_better_for_geneval_and_one_seed_is_inconclusive():
    assert verdict("beats", "geneval", [0.8, 0.82], [0.4, 0.41])["verdict"] == "reproduced"
    one = verdict("beats", "val_loss", [0.1], [0.9])
    assert one["verdict"] == "inconclusive" and math.isnan(one["se"])


@pytest.mark.parametrize("source,edit,match", [
    (MASKING, lambda d: d.update(bogus=1), "unknown key 'bogus'"),
    (MASKING, lambda d: d.update(budget={"flops": 1, "steps": 2}), "exactly one of flops or steps"),
    (MASKING, lambda d: d["claims"][0].update(b="nope"), r"claims\[0\].b: no variant 'nope'"),
    (MASKING, lambda d: d["variants"][6].update(narrow_to="nope"), "narrows to unknown variant 'nope'"),
    (SIZES, lambda d: d["eval"]["sweep"].update(samplers=["consistency"]), "not a diffusion sampler"),
    (SIZES, lambda d: d["eval"]["sweep"].update(guidances=[1.5, 6.0]), "fixed sampling point"),
    (SIZES, lambda d: d["eval"]["sweep"].pop("steps"), "samplers, steps, guidances"),
    (SIZES, lambda d: d["eval"].pop("sweep"), "needs budget and sampler, an eval.sweep"),
    (SIZES, lambda d: d["claims"][0].update(budget="middle"), "budget is lowest or highest"),
])
def test_experiment_file_errors_name_the_key(tmp_path, source, edit, match):
    assert_file_error(tmp_path, source, "demo_masked.yaml", edit, match)


def assert_file_error(tmp_path: Path, source: Path, base_recipe: str, edit, match: str) -> None:
    """The experiment file `source`, its base recipe from recipes/ and edited by `edit`, is refused naming `match`."""
    import yaml

    raw = yaml.safe_load(source.read_text())
    raw["base_recipe"] = str(REPO / "recipes" / base_recipe)
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=match):
        load_experiment(path)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    make("ablation", "QUICK=1", f"EXP_OUT={out}")
    make("ablation-arch", "QUICK=1", f"EXP_OUT={out}")
    return out


@pytest.mark.parametrize("name,exp_file", [("masking", MASKING), ("architecture", ARCH)])
@pytest.mark.slow
def test_quick_ablation_writes_results_for_every_run(quick_runs, name, exp_file):
    exp = load_experiment(exp_file, quick=True)
    results = json.loads((quick_runs / name / "results.json").read_text())
    assert results["experiment"] == exp_file.stem
    assert [v["name"] for v in results["variants"]] == [v.name for v in exp.variants]
    for row, plan in zip(results["variants"], plan_runs(exp), strict=True):
        assert row["steps"] == sum(s.steps for s in plan.stages) and row["flops"] == plan.flops
        m = row["metrics"]
        assert math.isfinite(m["val_loss"]) and m["val_loss"] > 0 and math.isfinite(m["fid"])
        assert 0 <= m["geneval"]["overall"] <= 1
        point = "{sampler}_{steps}_g{guidance:g}".format(**exp.eval["sampling"])
        assert (Path(row["run_dir"]) / "eval" / "points" / point / "geneval" / "00000" / "metadata.jsonl").is_file()
        assert row["usd"] > 0
    assert [c["name"] for c in results["claims"]] == [c["name"] for c in exp.claims]
    assert results["reader"]["ground_truth"]["overall"] >= 0.9 and "vae" in results["reader"]
    assert {c["verdict"] for c in results["claims"]} == {"inconclusive"}  # one seed in quick mode
    for png in ("val_loss_flops.png", "val_loss_usd.png"):
        assert (quick_runs / name / png).stat().st_size > 1000
    summary = (quick_runs / name / "summary.md").read_text()  # the tables in markdown, for the README
    assert sum(line.startswith("| --- |") for line in summary.splitlines()) == 3  # claims, metrics, tasks
    assert all(f"| {c['name']} |" in summary for c in results["claims"])


@pytest.mark.slow
def test_a_half_finished_experiment_reuses_finished_runs(quick_runs):
    import shutil

    root = quick_runs / "masking"
    redo = root / "runs" / "deferred_75_s0"
    unmarked = root / "runs" / "downscaled_s0" / "stage0"
    kept = root / "runs" / "no_masking_s0" / "stage0" / "metrics.jsonl"
    before = kept.stat().st_mtime_ns, (unmarked / "metrics.jsonl").stat().st_mtime_ns
    shutil.rmtree(redo)  # as if never trained
    (unmarked / "stage_done.json").unlink()  # trained to the end, killed before its marker was written
    out = make("ablation", "QUICK=1", f"EXP_OUT={quick_runs}").stdout
    assert "no_masking_s0 stage0: finished earlier, reused" in out
    assert "downscaled_s0 stage0: finished earlier, reused" in out and (unmarked / "stage_done.json").is_file()
    assert "deferred_75_s0 stage0: 4 steps" in out
    assert (kept.stat().st_mtime_ns, (unmarked / "metrics.jsonl").stat().st_mtime_ns) == before
    assert (redo / "eval" / "metrics.json").is_file()
    rows = {r["name"]: r for r in json.loads((root / "results.json").read_text())["variants"]}
    assert rows["deferred_75"]["steps"] == 4


@pytest.mark.slow
def test_experiment_report_renders_in_chromium(quick_runs):
    page = quick_runs / "masking" / "report.html"
    html = page.read_text()
    assert "https://" not in html and 'id="claims-table"' in html and 'id="metrics-table"' in html
    dom, console = render(page)
    assert console == [], console
    assert 'data-images="3/3"' in dom  # two validation-loss plots and quality against sampling cost
    assert "deferred beats downscaling (loss)" in dom and "inconclusive" in dom


@pytest.mark.slow
def test_a_run_trained_with_other_settings_is_an_error_not_reused(quick_runs, tmp_path):
    import argparse
    import shutil

    from micro_diffusion.errors import exit_with
    from micro_diffusion.experiments.cli import run

    out = tmp_path / "copy"
    shutil.copytree(quick_runs / "masking", out)
    marker = out / "runs" / "no_masking_s0" / "stage0" / "stage_done.json"
    saved = json.loads(marker.read_text())
    marker.write_text(json.dumps({**saved, "overrides": {**saved["overrides"], "optimizer.lr": 0.5}}))
    args = argparse.Namespace(file=str(MASKING), quick=True, seeds=None, variants=None, out=str(out), dry_run=False)
    assert exit_with("micro-diffusion experiment", lambda: run(args)) == 2
    assert json.loads(marker.read_text())["overrides"]["optimizer.lr"] == 0.5  # nothing rewritten


@pytest.mark.slow
def test_quick_families_compares_each_family_at_its_own_sampler(tmp_path):
    """`make families QUICK=1`: MicroDiT (two stages) and Fluid in both orders through the same runner, each sampled
    at its own fixed point, with sampling FLOPs and images/s in the results and a per-task GenEval-style table."""
    make("families", "QUICK=1", f"EXP_OUT={tmp_path}")
    exp = load_experiment(FAMILIES, quick=True)
    results = json.loads((tmp_path / "families" / "results.json").read_text())
    rows = {v["name"]: v for v in results["variants"]}
    assert list(rows) == ["microdit", "fluid_random", "fluid_raster"]
    for name, row in rows.items():
        m, want = row["metrics"], exp.variant(name).sampling or exp.eval["sampling"]
        assert m["sampling"]["sampler"] == want["sampler"] and m["sampling"]["steps"] == want["steps"]
        assert m["flops_per_image"] > 0 and m["images_per_s"] > 0 and math.isfinite(m["fid"])
        assert set(m["geneval"]) > {"overall"}
        config = json.loads((Path(row["run_dir"]) / "eval" / "model" / "config.json").read_text())
        assert config["family"] == ("dit" if name == "microdit" else "fluid")
    assert len(list((Path(rows["microdit"]["run_dir"])).glob("stage*"))) == 2
    assert rows["fluid_random"]["metrics"]["flops_per_image"] != rows["fluid_raster"]["metrics"]["flops_per_image"]
    assert [c["name"] for c in results["claims"]] == [c["name"] for c in exp.claims]
    summary = (tmp_path / "families" / "summary.md").read_text()
    tasks = [t for t in rows["microdit"]["metrics"]["geneval"] if t != "overall"]
    assert "| variant | " + " | ".join(tasks) + " | overall |" in summary  # the per-task table
