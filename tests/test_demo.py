"""The demo pipeline end to end at a much smaller size through `make demo QUICK=1`, then the other make targets
that need a finished run (report) or nothing (bench, lint, eval-coco as a dry run)."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from micro_diffusion.demo.pipeline import MARKER, DemoConfig, run_demo

REPO = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess:
    """Run a make target of the repository as a user would; fail the test with its output if it fails."""
    out = subprocess.run(["make", "-C", str(REPO), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, f"make {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make("demo", "QUICK=1", f"DEMO_ROOT={root}")
    return DemoConfig.quick(root), json.loads((root / "summary.json").read_text())


def test_summary_has_every_key_with_numbers_from_the_run(demo):
    cfg, summary = demo
    assert summary["wall_clock_s"] > 0
    assert [s["name"] for s in summary["stages"]] == ["demo_masked", "demo_finetune"]
    assert [s["mask_ratio"] for s in summary["stages"]] == [0.75, 0.0]
    for stage in summary["stages"]:
        assert stage["steps"] == 3
        for key in ("loss_first", "loss_last", "device_hours", "usd"):
            assert isinstance(stage[key], float) and math.isfinite(stage[key]) and stage[key] > 0
    ev = summary["eval"]
    assert ev["fid"]["images"] == cfg.heldout_images and ev["fid"]["value"] > 0
    assert 0 <= ev["caption_match"]["value"] <= 1 and 0 <= ev["caption_match"]["chance"] <= 1
    assert ev["caption_match_real"]["value"] >= 0.9  # the reader is trustworthy on real held-out scenes


def test_files_it_names_exist(demo):
    cfg, summary = demo
    assert (cfg.root / summary["samples"]).is_file()
    assert (cfg.root / summary["report"]).is_file()
    assert len(list((cfg.root / "eval" / "generated").glob("*.png"))) == cfg.heldout_images
    for stage in summary["stages"]:
        assert (cfg.root / stage["name"] / "cost.jsonl").is_file()
        assert (cfg.root / stage["name"] / "config.yaml").is_file()


def test_second_run_reuses_every_step(demo):
    cfg, first = demo
    again = run_demo(cfg)
    assert all(line.endswith("reused") for line in again["steps_log"])
    assert again["stages"] == first["stages"] and again["eval"] == first["eval"]
    assert again["step_seconds"] == first["step_seconds"]  # reused steps keep the time they took when run
    assert again["wall_clock_s"] >= sum(first["step_seconds"].values())


def test_fresh_refuses_a_folder_the_demo_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=MARKER):
        run_demo(DemoConfig(root=tmp_path, fresh=True))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_make_report_on_the_demo_runs(demo, tmp_path):
    cfg, _ = demo
    out = tmp_path / "dash.html"
    make("report", f"RUN={cfg.root / 'demo_masked'} {cfg.root / 'demo_finetune'}", f"OUT={out}")
    assert "demo_finetune" in out.read_text()


def test_make_bench_quick_writes_results():
    make("bench", "QUICK=1")
    results = REPO / "benchmarks" / "results"
    train = json.loads((results / "train_quick.json").read_text())
    assert {r["mask_ratio"] for r in train["runs"]} == {0.0, 0.5, 0.75} and train["moe"]["moe_over_dense"] > 0
    assert json.loads((results / "sample_quick.json").read_text())["images_per_s"] > 0


def test_make_eval_coco_dry_run_and_lint():
    assert "30000" in make("eval-coco", "CKPT=runs/res512_finetune", "DRY_RUN=1").stdout
    make("lint")
