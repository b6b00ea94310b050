"""Recipes: base merging, overrides, schema errors naming keys, stage order, missing inputs, dry runs, make targets."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from tiny_runs import REPO, write_shards

from micro_diffusion.cost.estimate import stage_flops
from micro_diffusion.data.inputs import missing_inputs
from micro_diffusion.demo.pipeline import CAPTION_LEN
from micro_diffusion.recipe import SCHEMA, RecipeError, build_network, load_recipe, merge, validate
from micro_diffusion.training.run import check_inputs, plan_run

RECIPES = REPO / "recipes"
STAGES = ["res256_masked", "res256_finetune", "res512_masked", "res512_finetune"]


def recipe(name: str, *overrides: str) -> dict:
    return load_recipe(RECIPES / f"{name}.yaml", list(overrides))


def test_stage_recipes_hold_the_papers_hyperparameters():
    s1, s2, s3, s4 = (recipe(s) for s in STAGES)
    for cfg in (s1, s2, s3, s4):
        assert cfg["train"]["global_batch"] == 2048
        assert cfg["optimizer"]["weight_decay"] == 0.1 and cfg["optimizer"]["betas"] == [0.9, 0.999]
        assert cfg["optimizer"]["moe_lr_scale"] == 0.5
    assert [c["train"]["device_microbatch"] for c in (s1, s2, s3, s4)] == [256, 64, 32, 16]
    assert [c["diffusion"]["mask_ratio"] for c in (s1, s2, s3, s4)] == [0.75, 0.0, 0.75, 0.0]
    assert [c["train"]["max_duration"] for c in (s1, s2, s3, s4)] == ["250000ba", "30000ba", "50000ba", "5000ba"]
    assert [c["optimizer"]["lr"] for c in (s1, s2, s3, s4)] == [2.4e-4, 8e-5, 8e-5, 8e-5]
    assert s1["scheduler"] == {"name": "cosine_warmup", "warmup": "2500ba", "alpha_f": 0.33}
    assert s2["scheduler"] == {"name": "constant"} and s4["scheduler"] == {"name": "constant"}
    assert s3["scheduler"] == {"name": "constant_warmup", "warmup": "500ba"}
    clips = [c["algorithms"]["gradient_clipping"]["threshold"] for c in (s1, s2, s3, s4)]
    assert clips == [0.25, 0.25, 0.5, 0.5]
    assert "ema" not in s1["algorithms"] and "ema" not in s2["algorithms"]
    assert s3["algorithms"]["ema"] == {"smoothing": 0.99975, "start": "25000ba"}
    assert s4["algorithms"]["ema"] == {"smoothing": 0.9975, "start": "1000ba"}
    assert (s3["diffusion"]["p_mean"], s3["diffusion"]["p_std"]) == (0.0, 0.6)
    assert (s1["diffusion"]["p_mean"], s1["diffusion"]["p_std"]) == (-0.6, 1.2)
    streams = {s["local"] for s in s3["data"]["streams"]}
    assert "diffusiondb" not in streams and "cc12m_512" in streams and "cc12m" not in streams
    assert len(s1["data"]["streams"]) == 5 and s3["data"]["resolution"] == 512



SPRINT_STAGES = ["res256_sprint", "res256_sprint_finetune", "res512_sprint", "res512_sprint_finetune"]


@pytest.mark.parametrize("res", [256, 512])
def test_sprint_stage_recipes_split_the_xl_backbone_in_place_of_masking(res):
    sprint, sprint_ft, masked, finetune = (recipe(f"res{res}_{kind}") for kind in
                                           ("sprint", "sprint_finetune", "masked", "finetune"))
    with torch.device("meta"):
        net, net_ft, paper_ft = (build_network(c) for c in (sprint, sprint_ft, finetune))
    # SPRINT's public XL split 2 / 24 / 2 on MicroDiT_XL_2's 28 backbone blocks, no patch-mixer, concat-linear fusion
    assert (net.cfg.sprint_encoder_depth, net.cfg.sprint_decoder_depth, len(net.blocks)) == (2, 2, 28)
    assert net.cfg.patch_mixer_depth == 0 and net.cfg.sprint_fusion == "concat_linear" and net.fusion is not None
    assert sprint["diffusion"]["mask_ratio"] == 0.75 and sprint_ft["diffusion"]["mask_ratio"] == 0.0
    same = ("optimizer", "scheduler", "algorithms", "train", "data")
    assert {k: sprint[k] for k in same} == {k: masked[k] for k in same}
    assert {k: sprint_ft[k] for k in (*same, "diffusion")} == {k: finetune[k] for k in (*same, "diffusion")}
    assert sprint["stages"] == sprint_ft["stages"] == SPRINT_STAGES and sprint_ft["init_from"] == f"res{res}_sprint"
    assert sprint["init_from"] == {256: None, 512: "res256_sprint_finetune"}[res]  # its own chain's 256 px finetune
    # the finetune builds the same network, so it loads the masked stage's weights; the paper's finetune could not
    shapes = [{k: v.shape for k, v in n.state_dict().items()} for n in (net, net_ft, paper_ft)]
    assert shapes[0] == shapes[1] and shapes[0] != shapes[2]
    per_sample = {name: stage_flops(cfg, 1, 1)[0] for name, cfg in
                  (("sprint", sprint), ("masked", masked), ("dense", sprint_ft), ("finetune", finetune))}
    print(f"res{res} GFLOP per sample:", {k: round(v / 1e9, 1) for k, v in per_sample.items()})
    # 24 of 28 blocks on a quarter of the tokens: about 0.75 * 24/28 of the dense SPRINT network's FLOPs saved
    assert 1 - per_sample["sprint"] / per_sample["dense"] == pytest.approx(0.75 * 24 / 28, rel=0.1)
    # no mixer on every token: cheaper per sample than deferred masking, which is cheaper than either unmasked network
    assert per_sample["sprint"] < per_sample["masked"] < per_sample["dense"] < per_sample["finetune"]

def test_demo_recipes():
    masked, finetune = recipe("demo_masked"), recipe("demo_finetune")
    assert masked["diffusion"]["mask_ratio"] == 0.75 and finetune["diffusion"]["mask_ratio"] == 0.0
    assert finetune["init_from"] == "demo_masked"
    plan = plan_run(finetune)
    assert plan.latent_size == 8 and plan.device == "cpu" and plan.precision == "fp32"
    assert plan.init_checkpoint.endswith("runs/demo/demo_masked/checkpoints/latest-rank0.pt")
    assert masked["data"]["root"] == "runs/demo/data" and masked["data"]["streams"][0]["local"] == "latents"
    assert (masked["model"]["caption_dim"], masked["model"]["caption_len"]) == (384, CAPTION_LEN)  # as precomputed


def test_schema_defaults_are_what_base_yaml_states():
    """One source of each default: base.yaml may restate the schema for readers, never disagree with it."""
    base = yaml.safe_load((RECIPES / "base.yaml").read_text())

    def differences(given, schema, where=""):
        if isinstance(given, dict) and isinstance(schema, dict) and where not in ("scheduler", "algorithms"):
            return [d for k, v in given.items() for d in differences(v, schema.get(k, KeyError(k)),
                                                                      f"{where}.{k}".strip("."))]
        return [] if given == schema else [f"{where}: base.yaml {given!r}, schema {schema!r}"]

    assert differences(base, SCHEMA) == []
    assert {k for k in SCHEMA if k not in ("base", "stage", "init_from", "init_checkpoint")} <= set(base)
    with_base = RECIPES / "res256_masked.yaml"  # base: base.yaml, and its stage name
    assert load_recipe(with_base) == validate({"stage": "res256_masked"})  # no base: the same recipe


def test_merge_and_overrides():
    assert merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"c": 3}, "l": [2]}) == {"a": {"b": 1, "c": 3}, "l": [2]}
    # only the named sections (the scheduler) are replaced whole by a section that names a new entry
    sched = {"scheduler": {"name": "cosine_warmup", "warmup": "5ba"}, "model": {"name": "a", "x": 1}}
    merged = merge(sched, {"scheduler": {"name": "constant"}, "model": {"name": "b"}})
    assert merged == {"scheduler": {"name": "constant"}, "model": {"name": "b", "x": 1}}
    assert merge(sched, {"scheduler": {"warmup": "9ba"}})["scheduler"] == {"name": "cosine_warmup", "warmup": "9ba"}
    cfg = recipe("res256_masked", "optimizer.lr=1e-3", "train.max_duration=10ba", "algorithms.ema={smoothing: 0.9}")
    assert cfg["optimizer"]["lr"] == 1e-3 and cfg["train"]["max_duration"] == "10ba"
    assert cfg["algorithms"]["ema"] == {"smoothing": 0.9, "start": "0ba"}
    assert "gradient_clipping" not in recipe("res512_masked", "algorithms.gradient_clipping=null")["algorithms"]


@pytest.mark.parametrize("override, named", [
    ("optimizer.learning_rate=1e-3", "optimizer.learning_rate"),
    ("trian.max_duration=5ba", "trian"),
    ("algorithms.gradient_clipping.treshold=1", "algorithms.gradient_clipping.treshold"),
    ("scheduler.alpha=0.5", "scheduler.alpha"),
    ("data.streams=[{local: x, weight: 2}]", "data.streams[0].weight"),
])
def test_misspelt_key_names_it(override, named):
    with pytest.raises(RecipeError, match="unknown recipe key " + re.escape(named) + " "):
        recipe("res256_masked", override)


def test_misspelt_key_in_a_file_names_it(tmp_path):
    (tmp_path / "base.yaml").write_text((RECIPES / "base.yaml").read_text())
    (tmp_path / "stage.yaml").write_text("base: base.yaml\nstage: res256_masked\ndiffusion: {mask_ration: 0.5}\n")
    with pytest.raises(RecipeError, match=r"diffusion\.mask_ration"):
        load_recipe(tmp_path / "stage.yaml")


def test_unknown_algorithm_and_scheduler_are_named():
    with pytest.raises(RecipeError, match="unknown algorithm 'swa'"):
        recipe("res256_masked", "algorithms.swa={}")
    with pytest.raises(RecipeError, match="unknown scheduler 'linear_decay'"):
        recipe("res256_masked", "scheduler={name: linear_decay}")


def test_wrong_stage_order_is_named():
    with pytest.raises(RecipeError, match=r"wrong stage order: stage 'res512_masked' .* needs init_from: "
                                          r"res256_finetune"):
        recipe("res512_masked", "init_from=res256_masked")
    with pytest.raises(RecipeError, match="wrong stage order: stage 'res256_masked'"):
        recipe("res256_masked", "init_from=res512_finetune")


def test_missing_data_and_previous_checkpoint_are_named(tmp_path):
    cfg = recipe("res256_finetune", f"data.root={tmp_path}", f"runs_root={tmp_path / 'runs'}")
    with pytest.raises(RecipeError) as err:
        check_inputs(cfg, plan_run(cfg))
    msg = str(err.value)
    assert f"{tmp_path}/sa1b/index.json" in msg and f"{tmp_path}/val/index.json" in msg
    assert f"{tmp_path}/runs/res256_masked/checkpoints/latest-rank0.pt does not exist" in msg


def test_shards_that_do_not_fit_the_recipe_are_named(tmp_path):
    write_shards(tmp_path / "latents", 4, cap_d=32)  # 8 x 32 caption tokens, 4 x 8 x 8 latents at 64 px
    local = [f"data.root={tmp_path}", "data.streams=[{local: latents}]", "data.val_streams=[]", "eval.interval=null"]
    cfg = recipe("res256_masked", *local, "data.resolution=64")
    problems = missing_inputs(cfg, None)
    enc, index = tmp_path / "latents" / "encoders.json", tmp_path / "latents" / "index.json"
    assert f"data.streams[0]: {enc} has caption_len 8, the recipe's model.caption_len is 77" in problems
    assert f"data.streams[0]: {enc} has caption_dim 32, the recipe's model.caption_dim is 1024" in problems
    assert any(f"{index}: caption_emb holds (8, 32), the recipe expects (77, 1024)" in p for p in problems)
    captions = ["model.caption_len=8", "model.caption_dim=32"]
    assert missing_inputs(recipe("res256_masked", *local, "data.resolution=64", *captions), None) == []
    other_res = missing_inputs(recipe("res256_masked", *local, *captions), None)
    assert any("resolutions [64], the recipe's data.resolution is 256" in p for p in other_res)
    assert any("no column 'latents_256' for resolution 256" in p for p in other_res)
    with pytest.raises(RecipeError, match="caption_len 8"):
        check_inputs(cfg, plan_run(cfg))


def test_batch_split_and_cpu_limits():
    cfg = recipe("res256_masked")
    plan = plan_run(cfg, world_size=8)
    assert (plan.device_batch, plan.device_microbatch) == (256, 256)
    with pytest.raises(RecipeError, match="does not divide the per-device batch 128"):
        plan_run(cfg, world_size=16)
    with pytest.raises(RecipeError, match="does not split over 3 devices"):
        plan_run(cfg, world_size=3)
    with pytest.raises(RecipeError, match="Composer supports only fp32 on CPU"):
        plan_run(recipe("res256_masked", "train.precision=amp_bf16", "train.device=cpu"))
    with pytest.raises(RecipeError, match="low_precision_layernorm runs on GPUs only"):
        plan_run(recipe("res256_masked", "algorithms.low_precision_layernorm={}", "train.device=cpu"))
    with pytest.raises(RecipeError, match="fsdp needs GPUs"):
        plan_run(recipe("res256_masked", "train.parallelism=fsdp", "train.device=cpu"), world_size=2)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "micro_diffusion.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_dry_run_prints_resolved_config_and_writes_nothing(tmp_path):
    out = _cli("train", "recipes/res512_masked.yaml", f"runs_root={tmp_path}", "train.max_duration=7ba", "--dry-run")
    assert out.returncode == 0, out.stderr
    info = yaml.safe_load(out.stdout)
    assert info["recipe"]["train"]["max_duration"] == "7ba" and info["micro_diffusion_version"]
    assert info["git_revision"]
    assert info["plan"]["init_checkpoint"].endswith("res256_finetune/checkpoints/latest-rank0.pt")
    assert "# missing inputs" in out.stdout and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_real_run_fails_at_once_naming_the_problem(tmp_path):
    out = _cli("train", "recipes/res256_masked.yaml", f"data.root={tmp_path}", "optimizer.lr_scale=2")
    assert out.returncode == 2 and "unknown recipe key optimizer.lr_scale" in out.stderr
    out = _cli("train", "recipes/res256_masked.yaml", f"data.root={tmp_path}", f"runs_root={tmp_path}")
    assert out.returncode == 2 and f"{tmp_path}/sa1b/index.json" in out.stderr


@pytest.mark.slow
def test_make_train_targets_dry_run(tmp_path):
    """CI runs every train-* target (train-all runs the four stage targets) as a dry run through the launcher."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(["make", "-o", "install", "train-all", "DRY_RUN=1", "NGPUS=1", f"RUNS_ROOT={tmp_path}/runs",
                          f"DATA_ROOT={tmp_path}/data"], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in STAGES:
        assert f"recipes/{stage}.yaml" in out.stdout and f"stage: {stage}" in out.stdout
    assert out.stdout.count("composer -n 1 --world_size") == 4
    assert out.stdout.count("micro_diffusion_version:") == 4
    assert not (tmp_path / "runs").exists()


def test_fsdp_keeps_bf16_weights_and_reduces_in_fp32():
    """On GPUs the recipes train under amp_bf16 with FSDP: Composer's DEFAULT mixed precision then gathers weights in
    bf16 (so autocast never casts a weight again) and reduces gradients in fp32."""
    from types import SimpleNamespace

    import torch
    from composer.distributed.mosaic_parallelism import get_mixed_precision

    from micro_diffusion.training.builder import parallelism_config

    fsdp = parallelism_config(SimpleNamespace(parallelism="fsdp"))["fsdp"]
    assert fsdp["sharding_strategy"] == "SHARD_GRAD_OP"
    _, param, reduce, _ = get_mixed_precision("amp_bf16", fsdp["mixed_precision"])
    assert (param, reduce) == (torch.bfloat16, torch.float32)
    assert parallelism_config(SimpleNamespace(parallelism="ddp")) is None


def test_recipe_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    """A recipe path is read relative to the current folder first, then under the repository's recipes/."""
    monkeypatch.chdir(tmp_path)
    want = load_recipe(RECIPES / "demo_masked.yaml")
    assert load_recipe("recipes/demo_masked.yaml") == want and load_recipe("demo_masked.yaml") == want
    (tmp_path / "demo_masked.yaml").write_text("base: recipes/demo_masked.yaml\ntrain: {seed: 5}\n")
    local = load_recipe("demo_masked.yaml")  # the current folder's file wins; its base resolves beside it
    assert local["train"]["seed"] == 5 and local["stage"] == want["stage"]
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("no_such_recipe.yaml")


def test_overrides_as_a_mapping_equal_the_command_line_strings():
    """{dotted key: typed value} and the CLI's key=value strings (parsed once, as YAML) give the same recipe."""
    from micro_diffusion.recipe import parse_overrides

    strings = ["train.max_duration=3ba", "diffusion.mask_ratio=0.5", "data.streams=[{local: a}]", "eval.interval=null"]
    mapping = {"train.max_duration": "3ba", "diffusion.mask_ratio": 0.5, "data.streams": [{"local": "a"}],
               "eval.interval": None}
    assert parse_overrides(strings) == mapping
    assert recipe("demo_masked", *strings) == load_recipe(RECIPES / "demo_masked.yaml", mapping)
    with pytest.raises(RecipeError, match="not of the form"):
        parse_overrides(["train.max_duration"])
