"""A trained network exports, loads and samples; exports carry their network format; a stage starts from an export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import REPO, tiny_overrides, write_shards  # noqa: I001

from micro_diffusion import load_exported
from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import SamplingSettings, generate_latents, image_seeds
from micro_diffusion.exported import NETWORK_FORMAT
from micro_diffusion.recipe import RecipeError, load_recipe
from micro_diffusion.training.builder import build_trainer
from micro_diffusion.training.export import export_run
from micro_diffusion.training.run import check_inputs, plan_run, run_info, write_run_info


def trainer(recipe: str, data_root: Path, runs: Path, *extra: str, info: bool = False):
    cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", tiny_overrides(data_root, runs, steps=2) + list(extra))
    plan = plan_run(cfg)
    check_inputs(cfg, plan)
    if info:
        write_run_info(run_info(cfg, plan), plan.run_dir)
    return build_trainer(cfg, plan), plan


@pytest.mark.slow
def test_trained_network_exports_loads_samples_and_starts_a_stage(tmp_path):
    data = tmp_path / "data"
    write_shards(data / "latents", 32, seed=0)
    runs = tmp_path / "runs"
    t, plan = trainer("demo_masked", data, runs, "optimizer.lr=3e-3", info=True)
    t.fit()
    t.close()
    out = export_run(plan.run_dir, tmp_path / "export")
    net, config, null = load_exported(out)
    assert config["network_format"] == NETWORK_FORMAT and config["null_caption"] == "shards"
    samples = load_recipe(REPO / "recipes" / "demo_masked.yaml")["samples"]  # the export records how to sample it
    assert config["sampling"] == {"steps": samples["steps"], "guidance": samples["guidance"],
                                  "sampler": samples["sampler"], "guidance_interval": None}
    emb, seeds = torch.randn(2, 8, 32), image_seeds(3, range(2))
    x = generate_latents(EDMPrecond(net, config["sigma_data"]), emb, null, SamplingSettings(steps=3, guidance=2.0),
                         seeds, (4, 8, 8))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()

    start = [f"init_checkpoint={out}"]
    with pytest.raises(RecipeError, match="init_from .demo_masked. and init_checkpoint .* are both set"):
        trainer("demo_finetune", data, runs, *start)
    with pytest.raises(RecipeError, match="trained with null captions 'shards'.*data.null_caption is 'zeros'"):
        trainer("demo_finetune", data, runs, "init_from=null", "data.null_caption=zeros", *start)
    t2, plan2 = trainer("demo_finetune", data, runs, "init_from=null", *start, "runs_root=" + str(tmp_path / "r2"))
    assert plan2.init_checkpoint == str(out)
    first = {k: v.clone() for k, v in t2.state.model.net.state_dict().items()}
    assert all(torch.equal(first[k], v) for k, v in net.state_dict().items())  # starts from the export's weights
    t2.fit()
    assert any(not torch.equal(first[k], v) for k, v in t2.state.model.net.state_dict().items())
    t2.close()


def test_an_export_of_another_network_format_is_refused(tmp_path):
    data = tmp_path / "data"
    write_shards(data / "latents", 16, seed=0)
    t, plan = trainer("demo_masked", data, tmp_path / "runs", info=True)
    t.fit()
    t.close()
    out = export_run(plan.run_dir, tmp_path / "export")
    cfg_file = out / "config.json"
    config = json.loads(cfg_file.read_text())
    del config["network_format"]  # as exports written before the format was recorded
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"holds network format 1, this micro_diffusion reads format {NETWORK_FORMAT}"):
        load_exported(out)
    assert np.load(out / "null_caption.npy").shape == (8, 32)  # the folder is untouched


def test_export_sampling_settings_follow_the_recipe_and_a_student_samples_by_consistency():
    from micro_diffusion.training.export import sampling_settings

    cfg = load_recipe(REPO / "recipes" / "demo_masked.yaml", {"samples.steps": 12, "samples.guidance": 3.5,
                                                               "samples.sampler": "euler"})
    assert sampling_settings(cfg) == {"steps": 12, "guidance": 3.5, "sampler": "euler", "guidance_interval": None}
    student = load_recipe(REPO / "recipes" / "demo_distill.yaml")
    assert sampling_settings(student) == {"steps": 1, "guidance": 1.0, "sampler": "consistency",
                                          "guidance_interval": None}
