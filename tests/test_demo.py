"""The demo pipeline end to end at a much smaller size: every key of summary.json, the files it names, reuse."""
import json
import math

import pytest

from micro_diffusion.demo.pipeline import MARKER, DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(root=root, train_images=64, heldout_images=12, grid_images=8, sample_steps=2,
                     train_overrides=["train.max_duration=3ba", "train.global_batch=16", "train.device_microbatch=16",
                                      "train.log_interval=1ba", "checkpoint.save_interval=3ba"])
    return cfg, run_demo(cfg)


def test_summary_has_every_key_with_numbers_from_the_run(demo):
    cfg, summary = demo
    saved = json.loads((cfg.root / "summary.json").read_text())
    assert saved["stages"] == summary["stages"]
    assert saved["wall_clock_s"] > 0
    names = [s["name"] for s in saved["stages"]]
    assert names == ["demo_masked", "demo_finetune"]
    assert [s["mask_ratio"] for s in saved["stages"]] == [0.75, 0.0]
    for stage in saved["stages"]:
        assert stage["steps"] == 3
        for key in ("loss_first", "loss_last", "device_hours", "usd"):
            assert isinstance(stage[key], float) and math.isfinite(stage[key]) and stage[key] > 0
    ev = saved["eval"]
    assert ev["fid"]["images"] == 12 and ev["fid"]["value"] > 0
    assert 0 <= ev["caption_match"]["value"] <= 1 and 0 <= ev["caption_match"]["chance"] <= 1
    assert ev["caption_match_real"]["value"] >= 0.9  # the reader is trustworthy on real held-out scenes


def test_files_it_names_exist(demo):
    cfg, summary = demo
    assert (cfg.root / summary["samples"]).is_file()
    assert (cfg.root / summary["report"]).is_file()
    assert len(list((cfg.root / "eval" / "generated").glob("*.png"))) == 12
    for stage in summary["stages"]:
        assert (cfg.root / stage["name"] / "cost.jsonl").is_file()
        assert (cfg.root / stage["name"] / "config.yaml").is_file()


def test_second_run_reuses_every_step(demo, capsys):
    cfg, first = demo
    again = run_demo(cfg)
    assert all(line.endswith("reused") for line in again["steps_log"])
    assert again["stages"] == first["stages"] and again["eval"] == first["eval"]


def test_fresh_refuses_a_folder_the_demo_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=MARKER):
        run_demo(DemoConfig(root=tmp_path, fresh=True))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
