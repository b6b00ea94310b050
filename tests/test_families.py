"""The model-family seam: every family through the same recipe checks, builder, Trainer, export, load and sampling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import CAP_D, CAP_L, MINILM_DIM, REPO, tiny_overrides, write_sampling_shards, write_shards  # noqa: I001

from micro_diffusion.cli import main as cli
from micro_diffusion.diffusion.sampling import SamplingSettings
from micro_diffusion.families import FAMILIES, check_preset, family_of
from micro_diffusion.recipe import RecipeError, build_network, load_recipe, parse_overrides

# What turns the MicroDiT test recipe into a Fluid one: the family, a tiny preset, no EDM keys, its sampler.
FLUID = ["model.family=fluid", "model.preset=Fluid_Micro", "model.overrides={}", "diffusion.mask_ratio=null",
         "diffusion.p_mean=null", "diffusion.p_std=null", "samples.sampler=fluid", "samples.steps=2",
         "samples.head_steps=3", "samples.temperature=0.9", "samples.guidance=2.0"]
EXTRA = {"dit": ["samples.steps=2", "samples.guidance=2.0"], "fluid": FLUID}


def recipe_for(family: str, data_root: Path, runs: Path, *extra: str, **kw) -> dict:
    """The demo recipe shrunk to seconds, as the given family."""
    return load_recipe(REPO / "recipes" / "demo_masked.yaml",
                       tiny_overrides(data_root, runs, **kw) + EXTRA[family] + list(extra))


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    """Shards whose encoders can sample: a tiny local VAE (16 px images) and the packaged MiniLM's caption width."""
    return write_sampling_shards(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_shards(root / "latents", 48, prefix="t", seed=0)
    return root


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_builds_trains_and_counts_through_the_table(family, data_root, tmp_path):
    cfg = recipe_for(family, data_root, tmp_path)
    fam = FAMILIES[family]
    torch.manual_seed(0)
    net = build_network(cfg)
    assert any(isinstance(m, fam.block_types) for m in net.modules())
    x0, y = torch.randn(4, 4, 8, 8), torch.randn(4, CAP_L, CAP_D)
    loss = fam.loss(net, x0, y, cfg["diffusion"], (None, None))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert fam.train_flops(net, 8, CAP_L, cfg["diffusion"]) > 0
    s = cfg["samples"]
    settings = SamplingSettings(steps=s["steps"], guidance=s["guidance"], sampler=s["sampler"],
                                temperature=s["temperature"], head_steps=s["head_steps"])
    guided, plain = (fam.sample_flops(net, 8, CAP_L, settings.__class__(**{**settings.__dict__, "guidance": g}))
                     for g in (2.0, 1.0))
    assert guided > plain > 0
    with torch.no_grad():
        z = fam.generate(net.eval(), y[:2], torch.zeros(CAP_L, CAP_D), settings, [3, 4], (4, 8, 8), 0.9)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()


def test_a_preset_of_the_other_family_is_one_error_naming_both(data_root, tmp_path):
    with pytest.raises(RecipeError, match=r"Fluid_Micro is a Fluid preset \(fluid\).*family is dit"):
        recipe_for("dit", data_root, tmp_path, "model.preset=Fluid_Micro", "model.overrides={}")
    with pytest.raises(RecipeError, match=r"MicroDiT_Tiny_2 is a MicroDiT preset \(dit\).*family is fluid"):
        recipe_for("fluid", data_root, tmp_path, "model.preset=MicroDiT_Tiny_2")
    with pytest.raises(Exception, match="unknown model family 'gan'"):
        check_preset("Fluid_Micro", "gan", "model.preset")


@pytest.mark.parametrize("extra, match", [
    (["diffusion.mask_ratio=0.5"], "diffusion.mask_ratio: Fluid .* does not read it"),
    (["eval.sigmas=4"], "eval.sigmas: Fluid has no EDM noise levels"),
    (["samples.sampler=heun", "samples.temperature=null", "samples.head_steps=null"],
     "samples.sampler: 'heun' samples MicroDiT models; model.family is fluid"),
    (["samples.guidance_interval=[0.1, 1.0]"], "guidance_interval"),
    (["samples.head_steps=0"], "head_steps must be an integer in"),
    (["model.overrides={order: spiral}"], "unknown Fluid order 'spiral'"),
    (["model.overrides={head_dim: 16}"], "model.overrides.head_dim: unknown model option"),
    (["model.overrides={order: raster}"], r"samples.steps 2: raster order reveals one token a pass, so it takes 16"),
])
def test_fluid_recipe_refuses_what_it_would_ignore(extra, match, data_root, tmp_path):
    with pytest.raises(RecipeError, match=match):
        recipe_for("fluid", data_root, tmp_path, *extra)


def test_a_dit_recipe_refuses_fluid_only_settings(data_root, tmp_path):
    with pytest.raises(RecipeError, match="temperature: settings of the fluid sampler"):
        recipe_for("dit", data_root, tmp_path, "samples.temperature=0.9")
    with pytest.raises(RecipeError, match="diffusion.mask_ratio: MicroDiT reads it"):
        recipe_for("dit", data_root, tmp_path, "diffusion.mask_ratio=null")


def test_distillation_is_refused_for_fluid(data_root, tmp_path):
    with pytest.raises(RecipeError, match="distill: consistency distillation applies to MicroDiT"):
        recipe_for("fluid", data_root, tmp_path, "distill={guidance: 2.0}", "init_checkpoint=x")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainer_fit_export_load_and_sample_each_family(family, sample_root, tmp_path, capsys):
    """A real Trainer.fit through the shared builder (ledger, EMA, NaN guard), export, load_exported and sample in
    both layouts; a sampler of the other family is one line naming both."""
    from micro_diffusion import load_exported
    from micro_diffusion.cost.ledger import last_totals
    from micro_diffusion.training import train
    from micro_diffusion.training.export import export_run

    given = tiny_overrides(sample_root, tmp_path / "runs", steps=4) + EXTRA[family] + [
        f"model.caption_dim={MINILM_DIM}", "algorithms.ema={smoothing: 0.9}", f"stage=tiny_{family}", "stages=[]",
        "data.val_streams=[{local: latents}]", "eval.interval=2ba", "eval.batches=1", "eval.batch_size=4",
        "samples.interval=4ba", "samples.prompts=[a red square, a blue circle]"]
    run = train(REPO / "recipes" / "demo_masked.yaml", parse_overrides(given))
    totals = last_totals(run.run_dir)
    assert totals is not None and totals[0].flops > 0
    assert sorted(p.name for p in (run.run_dir / "samples").glob("*.png")) == ["ba4.png", "ba4_ema.png"]
    val = [r["val/loss"] for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
           if "val/loss" in r]
    assert len(val) == 2 and all(np.isfinite(val))
    model = export_run(run.run_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    assert config["family"] == family and config["sampling"]["sampler"] == run.recipe["samples"]["sampler"]
    net, cfg, _ = load_exported(model)
    assert family_of(cfg).name == family and isinstance(net, torch.nn.Module)

    flat = tmp_path / "flat"
    assert cli(["sample", str(model), "--prompt", "a red square", "--prompt", "a blue circle", "--seed", "1",
                "--out", str(flat)]) == 0
    assert sorted(p.name for p in flat.glob("0*.png")) == ["00000.png", "00001.png"]
    again = tmp_path / "again"
    assert cli(["sample", str(model), "--prompt", "a red square", "--seed", "1", "--out", str(again)]) == 0
    first = np.asarray(Image.open(flat / "00000.png"))
    assert first.shape[:2] == (16, 16)
    assert np.array_equal(first, np.asarray(Image.open(again / "00000.png")))  # image 0 alone equals image 0 of two
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                "prompt": "a photo of a circle"}) + "\n")
    gen = tmp_path / "geneval"
    assert cli(["sample", str(model), "--prompts", str(meta), "--layout", "geneval", "--images-per-prompt", "2",
                "--out", str(gen)]) == 0
    assert sorted(p.name for p in (gen / "00000" / "samples").glob("*.png")) == ["0000.png", "0001.png"]

    other = "heun" if family == "fluid" else "fluid"
    capsys.readouterr()
    assert cli(["sample", str(model), "--prompt", "x", "--sampler", other, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and FAMILIES[family].title in err[0] and other in err[0], err


def test_default_sampling_follows_the_network():
    """An export without recorded sampling gets its family's defaults; raster order one pass a token."""
    from micro_diffusion.eval.generate import settings_for
    from micro_diffusion.models.fluid import create_fluid

    for order, steps in (("random", 64), ("raster", 16)):
        network = create_fluid("Fluid_Micro", latent_size=8, caption_dim=CAP_D, order=order).cfg.to_dict()
        s = settings_for({"family": "fluid", "network": network})
        assert (s.sampler, s.steps, s.head_steps, s.temperature) == ("fluid", steps, 100, 0.975)
    assert settings_for({"network": {}}).sampler == "heun"  # an export that names no family is a MicroDiT's
