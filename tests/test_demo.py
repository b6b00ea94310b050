"""The demo pipeline end to end at a much smaller size through `make demo QUICK=1`, then the other make targets
that need a finished run (report) or nothing (bench, lint, eval-coco as a dry run)."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_runs import make

from benchmarks.common import QUICK
from micro_diffusion.cost.flops import sample_flops_per_image, train_flops_per_sample
from micro_diffusion.data.shapes import parse_caption
from micro_diffusion.demo import STEPS
from micro_diffusion.demo.pipeline import MARKER, DemoConfig, heldout_captions, run_demo
from micro_diffusion.diffusion.sampling import DEFAULTS
from micro_diffusion.errors import UsageError
from micro_diffusion.eval.compose import geneval_score
from micro_diffusion.eval.reader import caption_match, shuffled_match
from micro_diffusion.models import create_dit
from micro_diffusion.utils.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stage_figures_are_the_runs_own(demo):
    cfg, summary = demo
    assert [s["name"] for s in summary["stages"]] == ["demo_masked", "demo_finetune", "demo_distill", "demo_fluid"]
    assert [s["mask_ratio"] for s in summary["stages"]] == [0.75, 0.0, 0.0, None]  # Fluid draws one per batch
    fluid = summary["fluid"]
    assert {"caption_match", "geneval", "fid", "images_per_s", "train_flops"} <= set(fluid)
    assert 0 <= fluid["caption_match"] <= 1 and 0 <= fluid["geneval"] <= 1 and np.isfinite(fluid["fid"])
    assert fluid["train_flops"] == read_jsonl(Path(summary["stages"][-1]["run_dir"]) / "cost.jsonl")[-1][
        "stage_totals"]["flops"] and fluid["sampling"]["sampler"] == "fluid"
    for stage in summary["stages"]:
        run = Path(stage["run_dir"])
        losses = [r["loss/train/total"] for r in read_jsonl(run / "metrics.jsonl") if "loss/train/total" in r]
        w = stage["loss_window"]
        assert stage["steps"] == len(losses) == 3
        assert stage["loss_first"] == pytest.approx(np.mean(losses[:w])) and stage["loss_last"] == pytest.approx(
            np.mean(losses[-w:]))
        totals = read_jsonl(run / "cost.jsonl")[-1]["stage_totals"]
        assert (stage["device_hours"], stage["usd"]) == (totals["device_hours"], totals["usd"])
    assert summary["wall_clock_s"] >= sum(summary["step_seconds"].values())
    assert tuple(summary["step_seconds"]) == STEPS  # the order the dry run prints


@pytest.mark.slow
def test_caption_match_and_chance_are_what_the_reader_reads(demo):
    cfg, summary = demo
    real_paths, captions = heldout_captions(cfg)
    labels = [parse_caption(c) for c in captions]
    generated = sorted((cfg.root / "eval" / "generated").glob("*.png"))
    assert len(generated) == len(real_paths) == cfg.heldout_images
    fake = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in generated])
    real = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in real_paths])
    ev = summary["eval"]
    assert ev["caption_match"]["value"] == caption_match(fake, labels)
    assert ev["caption_match"]["chance"] == shuffled_match(fake, labels, seed=cfg.seed)
    assert ev["caption_match_real"]["value"] == caption_match(real, labels) >= 0.9  # the reader reads real scenes
    assert ev["fid"]["images"] == ev["fid"]["reference_images"] == cfg.heldout_images
    assert ev["geneval"] == geneval_score(fake, labels)
    assert ev["geneval_real"]["overall"] == 1.0 and list(ev["geneval_real"]["tasks"]) == ["single_object", "colors"]
    white = sum(lab.colour == "white" for lab in labels)
    assert ev["geneval"]["left_out"] == white and ev["geneval"]["images"] == len(labels) - white


@pytest.mark.slow
def test_the_distilled_student_is_scored_like_its_teacher(demo):
    cfg, summary = demo
    _, captions = heldout_captions(cfg)
    labels = [parse_caption(c) for c in captions]
    dis = summary["distilled"]
    assert sorted(dis["steps"]) == ["1", "2", "4"]
    for k, entry in dis["steps"].items():
        images = sorted((cfg.root / "eval" / f"student_{k}step").glob("*.png"))
        fake = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])
        assert len(images) == cfg.heldout_images and entry["caption_match"] == caption_match(fake, labels)
        assert entry["geneval"] == geneval_score(fake, labels)["overall"]
    assert dis["teacher"]["caption_match"] == summary["eval"]["caption_match"]["value"]
    assert dis["teacher"]["sampling"] == {"steps": cfg.sample_steps, "guidance": cfg.guidance, "sampler": cfg.sampler,
                                          "guidance_interval": None}
    ledgers = {s["name"]: read_jsonl(Path(s["run_dir"]) / "cost.jsonl")[-1]["stage_totals"]["flops"]
               for s in summary["stages"]}
    assert dis["distill_flops"] == ledgers["demo_distill"]
    assert dis["teacher_train_flops"] == ledgers["demo_masked"] + ledgers["demo_finetune"]
    student = json.loads((Path(summary["student"]) / "config.json").read_text())
    assert student["distilled"]["guidance"] == cfg.guidance


@pytest.mark.slow
def test_files_it_names_exist(demo):
    cfg, summary = demo
    with Image.open(cfg.root / summary["samples"]) as grid:
        assert grid.size == (8 * 96, 96)  # the first 8 held-out captions, 96 px tiles in one row
    assert (cfg.root / summary["report"]).is_file()
    for stage in summary["stages"]:
        assert (cfg.root / stage["name"] / "config.yaml").is_file()


@pytest.mark.slow
def test_the_demo_exports_card_holds_its_cost_and_scores(demo):
    """runs/demo/model/README.md: the two teacher stages' ledgers and the demo's scores of these very weights."""
    from huggingface_hub import ModelCard

    cfg, summary = demo
    card = ModelCard.load(Path(summary["model"]) / "README.md")
    assert card.data.library_name == "micro-diffusion" and card.data.pipeline_tag == "text-to-image"
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores["fid"] == round(summary["eval"]["fid"]["value"], 4)
    assert scores["geneval"] == round(summary["eval"]["geneval"]["overall"], 4)
    usd = sum(s["usd"] for s in summary["stages"][:2])  # demo_masked and demo_finetune: the teacher's chain
    assert f"${usd:.4g} and" in card.text and "| demo_masked |" in card.text and "demo_distill" not in card.text
    assert f'Pipeline.from_pretrained("{summary["model"]}")' in card.text


@pytest.mark.slow
def test_second_run_reuses_every_step(demo):
    cfg, first = demo
    again = run_demo(cfg)
    assert all(line.endswith("reused") for line in again["steps_log"])
    assert again["stages"] == first["stages"] and again["eval"] == first["eval"]
    assert again["step_seconds"] == first["step_seconds"]  # reused steps keep the time they took when run
    assert again["wall_clock_s"] >= sum(first["step_seconds"].values())


def test_fresh_refuses_a_folder_the_demo_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match=MARKER):
        run_demo(DemoConfig(root=tmp_path, fresh=True))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_dry_run_prints_its_plan_and_writes_nothing(tmp_path, capsys):
    from micro_diffusion.cli import main

    assert main(["demo", "--quick", "--dry-run", "--out", str(tmp_path / "demo")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["root"] == str(tmp_path / "demo") and plan["config"]["sample_steps"] == 2
    steps = {s["step"]: s for s in plan["steps"]}
    assert list(steps)[:3] == ["data", "train_masked", "train_finetune"] and "train_distill" in steps
    assert steps["train_masked"]["recipe"] == DemoConfig().masked_recipe and not steps["data"]["reused"]
    assert Path(steps["train_masked"]["recipe_file"]).is_file()  # found from any folder
    assert not (tmp_path / "demo").exists()


class _Table(HTMLParser):
    """The cells of the dashboard's cost table, row by row."""

    def __init__(self):
        super().__init__()
        self.rows, self._in = [], False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        self._in = tag in ("td", "th")
        if self._in:
            self.rows[-1].append("")  # a cell, empty until its text arrives

    def handle_data(self, data):
        if self._in:
            self.rows[-1][-1] += data

    def handle_endtag(self, tag):
        self._in = False


@pytest.mark.slow
def test_make_report_on_the_demo_runs(demo, tmp_path):
    cfg, summary = demo
    out = tmp_path / "dash.html"
    make("report", f"RUN={' '.join(s['run_dir'] for s in summary['stages'])}", f"OUT={out}")
    table = _Table()
    table.feed(out.read_text())
    rows = {r[0]: r for r in table.rows[1:] if r}
    header = table.rows[0]
    for stage in summary["stages"]:
        totals = read_jsonl(Path(stage["run_dir"]) / "cost.jsonl")[-1]["stage_totals"]
        row = rows[stage["name"]]
        assert row[header.index("images seen")] == f"{totals['samples']:,.0f}"
        assert row[header.index("FLOPs")] == f"{totals['flops']:.3g}"
    both = [read_jsonl(Path(s["run_dir"]) / "cost.jsonl")[-1]["stage_totals"]["samples"] for s in summary["stages"]]
    assert rows["total"][header.index("images seen")] == f"{sum(both):,.0f}"


@pytest.mark.slow
def test_make_bench_quick_writes_consistent_results_into_its_folder(tmp_path):
    make("bench", "QUICK=1", f"BENCH_OUT={tmp_path}")
    train = json.loads((tmp_path / "train_quick.json").read_text())
    assert {r["mask_ratio"] for r in train["runs"]} == {0.0, 0.5, 0.75}
    for r in train["runs"]:
        overrides = {**QUICK, "patch_mixer_depth": 0} if r["masking"] == "naive" else QUICK
        net = create_dit(r["preset"], latent_size=train["latent"], caption_dim=train["caption"][1], **overrides)
        flops = train_flops_per_sample(net, train["latent"], train["caption"][0], r["mask_ratio"])
        assert r["gflop_per_image"] == pytest.approx(flops / 1e9) and r["images_per_s"] == pytest.approx(
            r["batch"] / r["seconds"])
    sample = json.loads((tmp_path / "sample_quick.json").read_text())
    net = create_dit(sample["preset"], latent_size=8, caption_dim=32, **QUICK)
    assert sample["network_evaluations"] == 2 * sample["steps"] - 1 and sample["sampler"] == DEFAULTS.sampler
    assert sample["gflop_per_image"] == pytest.approx(sample_flops_per_image(net, 8, 7, sample["steps"]) / 1e9)
    compose = json.loads((tmp_path / "compose_quick.json").read_text())
    for r in compose["runs"]:
        assert r["scenes_per_s"] == pytest.approx(r["scenes"] / r["draw_seconds"], rel=0.05)
        assert r["objects"] >= r["scenes"]  # every scene holds at least one object, and the reader finds it
    ckpt = json.loads((tmp_path / "checkpointing_quick.json").read_text())
    assert [(r["mask_ratio"], r["checkpointing"]) for r in ckpt["runs"]] == [(0.75, False), (0.75, True),
                                                                             (0.0, False), (0.0, True)]
    for c in ckpt["comparison"]:  # the harness's arithmetic; at this size the figures are noise
        kept, recomputed = (r for r in ckpt["runs"] if r["mask_ratio"] == c["mask_ratio"])
        assert c["time_ratio"] == pytest.approx(recomputed["seconds"] / kept["seconds"])
        assert recomputed["activations_mb"] < kept["activations_mb"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["checkpointing_quick.json", "compose_quick.json",
                                                               "convert_quick.json", "data_quick.json",
                                                               "sample_quick.json", "train_quick.json"]


@pytest.mark.slow
def test_make_eval_coco_dry_run_prints_the_protocol_and_lint_passes():
    out = make("eval-coco", "CKPT=runs/res512_finetune", "DRY_RUN=1").stdout
    plan = json.loads(out[out.index("{"):])
    assert (plan["num"], plan["draw_seed"], plan["seed"], plan["model"]) == (30000, 2014, 0, "runs/res512_finetune")
    assert plan["sampling"] == DEFAULTS.to_dict()
    assert re.search(r"captions_val2014\.json$", plan["annotations"]) and plan["clip_model"] == "ViT-L-14"
    make("lint")


@pytest.mark.slow
def test_make_dry_runs_print_plans_and_write_nothing(tmp_path):
    """`make demo DRY_RUN=1` and `make experiment NAME=... DRY_RUN=1` (and its alias) plan, and train nothing."""
    out = make("demo", "DRY_RUN=1", f"DEMO_ROOT={tmp_path / 'demo'}").stdout
    plan = json.loads(out[out.index("{"):])
    assert [s["step"] for s in plan["steps"]] == list(STEPS) and plan["config"]["root"] == str(tmp_path / "demo")
    for target in (("experiment", "NAME=masking"), ("ablation",)):
        out = make(*target, "DRY_RUN=1", "QUICK=1", f"EXP_OUT={tmp_path / 'exp'}").stdout
        assert re.search(r"\[experiment\] \S+_s0: .* FLOPs", out), out[-2000:]
    assert list(tmp_path.iterdir()) == []
