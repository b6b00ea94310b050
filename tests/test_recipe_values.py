"""Recipe values (micro_diffusion/recipe_checks.py): each bad value is refused by load_recipe, and by the dry run
through the command line in one stderr line naming the key, exit 2, before any model is built; every shipped recipe
and experiment still loads; the duration parser agrees with Composer's own."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from micro_diffusion import cli
from micro_diffusion.experiments import runner
from micro_diffusion.experiments.plan import plan_runs, stage_config
from micro_diffusion.experiments.spec import load_experiment
from micro_diffusion.models.dit import MicroDiT
from micro_diffusion.recipe import RecipeError, load_recipe
from micro_diffusion.recipe_checks import parse_time

REPO = Path(__file__).resolve().parents[1]
DEMO = "recipes/demo_masked.yaml"
EXPERIMENTS = sorted((REPO / "recipes" / "experiments").glob("*.yaml"))

# The values (and two more): override -> key the one stderr line must name, and a phrase of its message.
DRY_RUN_TABLE = [
    ("train.max_duration=abc", "train.max_duration", "'abc' is not a positive duration"),
    ("train.max_duration=-5ba", "train.max_duration", "'-5ba' is not a positive duration"),
    ("model.preset=MicroDiT_XXL_2", "model.preset", "allowed: MicroDiT_Tiny_2"),
    ("samples.sampler=eulerr", "samples.sampler", "allowed: ddim, dpmpp_2m, euler, heun, stochastic"),
    ("samples.steps=-3", "samples.steps", "must be a positive integer, got -3"),
    ("train.device_microbatch=0", "train.device_microbatch", "must be a positive integer, got 0"),
    ("train.global_batch=-1", "train.global_batch", "must be a positive integer, got -1"),
    ("samples.sampler=consistency", "samples.sampler", "samples distilled students"),
    ("model.overrides.widht=128", "model.overrides.widht", "unknown model option"),
]


@pytest.fixture
def no_model(monkeypatch) -> list[str]:
    """Any MicroDiT built (on any device, the meta one too) is recorded and fails the command."""
    built: list[str] = []

    def refuse(self, cfg):
        built.append(repr(cfg))
        raise AssertionError("a model was built")

    monkeypatch.setattr(MicroDiT, "__init__", refuse)
    return built


@pytest.mark.parametrize("override,key,phrase", DRY_RUN_TABLE)
def test_dry_run_refuses_a_bad_value_naming_the_key(override, key, phrase, no_model, capsys, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", DEMO, override, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("micro-diffusion train: ") and "Traceback" not in err
    assert key in err and phrase in err, err
    assert no_model == [] and not any(tmp_path.iterdir())


def test_the_dry_run_of_good_values_builds_no_model_either(no_model, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", DEMO, "train.max_duration=2ep", "--dry-run"]) == 0
    assert "max_duration: 2ep" in capsys.readouterr().out and no_model == []


def demo(*overrides: str, recipe: str = DEMO) -> dict:
    return load_recipe(recipe, list(overrides))


# override -> what the error must say (a regular expression); one test, as the suite's per-test teardown costs ~1 s
REFUSED = [
    # durations: Composer's form, positive where a run needs one, a unit Composer takes at that key
    ("train.max_duration=abc", r"train.max_duration: 'abc' is not a positive duration: give a whole number above 0 "
                               r"and a unit among ba, ep, sp, tok \(e.g. '100ba', '2ep'\)"),
    ("train.max_duration=0ba", "train.max_duration: '0ba' is not a positive duration"),
    ("train.max_duration=0.5dur", "train.max_duration: '0.5dur'"),
    ("train.max_duration=1.5ba", "train.max_duration: '1.5ba'"),
    ("train.log_interval=10sp", r"train.log_interval: '10sp' .* unit among ba, ep \("),
    ("checkpoint.save_interval=-5ba", "checkpoint.save_interval: '-5ba'"),
    ("checkpoint.save_interval=null", "checkpoint.save_interval: None"),
    ("checkpoint.save_interval=1.5dur", r"checkpoint.save_interval: '1.5dur' .* X in \(0, 1\]"),
    ("samples.interval=5", "samples.interval: expected str"),
    ("samples.interval=0ba", "samples.interval: '0ba'"),
    ("scheduler.warmup=-1ba", r"scheduler.warmup: '-1ba' is not a duration: give a whole number \(0 or more\)"),
    ("scheduler.warmup=10sp", "scheduler.warmup '10sp' counts sp but train.max_duration '1200ba' counts ba"),
    ("algorithms.ema={start: 5x}", "algorithms.ema.start: '5x'"),
    # presets, samplers, steps, batches
    ("model.preset=MicroDiT_XXL_2",
     "model.preset: unknown MicroDiT preset 'MicroDiT_XXL_2' .allowed: MicroDiT_Tiny_2, "),
    ("samples.sampler=eulerr", "samples.sampler: unknown sampler 'eulerr'"),
    ("samples.sampler=consistency", "'consistency' samples distilled students"),
    ("samples.steps=0", "samples.steps: must be a positive integer, got 0"),
    ("samples.steps=2.5", "samples.steps: expected int"),
    ("train.global_batch=0", "train.global_batch: must be a positive integer"),
    ("train.device_microbatch=-4", "train.device_microbatch: must be a positive integer"),
    ("train.device_microbatch=5", "train.device_microbatch 5 does not divide train.global_batch 32"),
    ("eval.batches=0", "eval.batches: must be a positive integer"),
    ("eval.batch_size=-1", "eval.batch_size: must be a positive integer"),
    ("data.num_workers=-1", "data.num_workers: must be an integer >= 0"),
    ("checkpoint.keep=0", r"checkpoint.keep: how many checkpoints to keep \(1 or more, or -1 for all\), got 0"),
    # ratios, rates and scales in range
    ("data.caption_drop_prob=1.5", r"data.caption_drop_prob: must be a number in \[0, 1\], got 1.5"),
    ("data.caption_drop_prob=-0.1", "data.caption_drop_prob: must be a number in"),
    ("diffusion.mask_ratio=1.0", r"diffusion.mask_ratio: must be a number in \[0, 1\)"),
    ("diffusion.p_std=0", "diffusion.p_std: must be a number > 0"),
    ("diffusion.sigma_data=-1", "diffusion.sigma_data: must be a number > 0"),
    ("optimizer.lr=0", "optimizer.lr: must be a number > 0, got 0.0"),
    ("optimizer.lr=-1e-3", "optimizer.lr: must be a number > 0"),
    ("optimizer.eps=0", "optimizer.eps: must be a number > 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay: must be a number >= 0"),
    ("optimizer.betas=[0.9]", r"optimizer.betas: two numbers in \[0, 1\)"),
    ("optimizer.betas=[1.0, 0.9]", "optimizer.betas: two numbers"),
    ("scheduler.alpha_f=1.5", r"scheduler.alpha_f: must be a number in \[0, 1\]"),
    ("algorithms.gradient_clipping.threshold=0", "algorithms.gradient_clipping.threshold: must be a number > 0"),
    ("algorithms.gradient_clipping.type=l2", r"algorithms.gradient_clipping.type: unknown value 'l2' \(allowed: norm"),
    ("algorithms.ema={smoothing: 1.0}", r"algorithms.ema.smoothing: must be a number in \(0, 1\), got 1.0"),
    ("samples.guidance=0.5", "samples.guidance: must be a number >= 1, got 0.5"),
    ("cost.max_usd=0", "cost.max_usd: must be a number > 0"),
    ("cost.usd_per_device_hour=-2", "cost.usd_per_device_hour: must be a number >= 0"),
    # sizes, streams and the network the preset and overrides give (checked without building it)
    ("data.vae_downsample=0", "data.vae_downsample: must be a positive integer, got 0"),
    ("data.resolution=-32", "data.resolution: must be a positive integer"),
    ("data.resolution=30", "data.resolution 30 is not a multiple of data.vae_downsample 4"),
    ("model.caption_dim=0", "model.caption_dim: must be a positive integer"),
    ("data.streams=[]", "data.streams: empty"),
    ("data.streams=[{local: a, proportion: -1}]", r"data.streams\[0\].proportion: a number > 0 or null"),
    ("model.overrides.widht=128", r"model.overrides.widht: unknown model option \(allowed: attn_mult, "),
    ("model.overrides.latent_size=4", r"model.overrides.latent_size: set by the recipe \(data.resolution"),
    ("model.overrides.width=abc", "model.overrides.width: expected int, got 'abc'"),
    ("model.overrides.attn_mult=[1]", r"model.overrides.attn_mult: expected tuple\[float, float\], got \[1\]"),
    ("model.overrides.width=100", "width 100 must be a multiple of head_dim 32 and of 4"),
    ("model.overrides.head_dim=0", "head_dim must be >= 1, got 0"),
    ("model.overrides.depth=0", "depth must be >= 1, got 0"),
    ("model.overrides.patch_mixer_width=100", "patch_mixer_width 100 must be a multiple of head_dim 32"),
    ("model.overrides.patch_size=3", r"the latent side 8 \(data.resolution / data.vae_downsample\) is not a multiple"),
    ("model.overrides.capacity_factor=0", "capacity_factor and mixer_ffn_mult must be > 0"),
]
ACCEPTED = [
    ["train.max_duration=2ep"], ["train.max_duration=1000sp", "scheduler.warmup=0.1dur"], ["train.max_duration=5tok",
    "scheduler.warmup=0tok"], ["scheduler.warmup=0ba"], ["scheduler.warmup=2ep"], ["checkpoint.save_interval=0.25dur"],
    ["algorithms.ema={smoothing: 0.999, start: 0ba}"], ["algorithms.ema={start: 0.5dur}"], ["checkpoint.keep=-1"],
    ["samples.guidance=1"], ["train.device_microbatch=8"], ["samples.interval=1dur"], ["optimizer.lr=1e-3"],
    ["data.caption_drop_prob=0"], ["scheduler={name: constant}", "train.max_duration=3sp"],
    ["model.overrides.patch_size=4"], ["model.overrides={width: 64, head_dim: 16, attn_mult: [1, 2]}"],
]


def not_refused(load, cases) -> list[str]:
    """The cases `load` accepts, or refuses with a message that does not match: empty when each is refused as wanted."""
    wrong = []
    for case, match in cases:
        try:
            load(case)
            wrong.append(f"{case}: loaded")
        except RecipeError as err:
            if not re.search(match, str(err)):
                wrong.append(f"{case}: {err}")
    return wrong


def test_load_recipe_refuses_each_bad_value_naming_the_key():
    wrong = not_refused(demo, REFUSED)
    assert not wrong, "\n".join(wrong)


def test_values_a_run_takes_load():
    for overrides in ACCEPTED:
        demo(*overrides)


def test_a_distillation_recipe_may_sample_with_the_students_sampler():
    cfg = demo("samples.sampler=consistency", "samples.steps=2", recipe="recipes/demo_distill.yaml")
    assert cfg["samples"]["sampler"] == "consistency"
    with pytest.raises(RecipeError, match="distill.guidance: must be a number >= 1, got 0.5"):
        demo("distill.guidance=0.5", recipe="recipes/demo_distill.yaml")
    with pytest.raises(RecipeError, match=r"distill.teacher_weights: unknown value 'best' \(allowed: auto, ema, raw"):
        demo("distill.teacher_weights=best", recipe="recipes/demo_distill.yaml")
    with pytest.raises(RecipeError, match="distill.tangent_warmup: must be an integer >= 0"):
        demo("distill.tangent_warmup=-1", recipe="recipes/demo_distill.yaml")


def test_eval_interval_may_be_off_and_needs_a_positive_duration_when_on():
    assert demo("eval.interval=null")["eval"]["interval"] is None
    assert load_recipe("recipes/res256_masked.yaml", ["eval.interval=0.5dur"])["eval"]["interval"] == "0.5dur"
    with pytest.raises(RecipeError, match="eval.interval: 'abc' is not a positive duration"):
        load_recipe("recipes/res256_masked.yaml", ["eval.interval=abc"])


def test_every_shipped_recipe_and_experiment_variant_loads():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 10 and len(EXPERIMENTS) >= 3
    for path in recipes:  # base.yaml names no stage: it loads as the first stage of its own `stages:` order
        assert load_recipe({"base": str(path), "stage": "res256_masked"} if path.name == "base.yaml" else path)
    for path in EXPERIMENTS:
        for quick in (False, True):
            exp = load_experiment(path, quick=quick)
            for variant in exp.variants:
                stage_config(exp, variant.overrides)
                if variant.then:
                    stage_config(exp, {**variant.overrides, **variant.then["overrides"]})


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_stage_loads_as_the_runner_gives_it(path, tmp_path):
    """The runner's own overrides (steps, intervals, folders) on every planned stage, as `make ablation` trains."""
    for quick in (False, True):
        exp = load_experiment(path, quick=quick)
        for run in plan_runs(exp, exp.seeds[:1]):
            for k in range(len(run.stages)):
                load_recipe(exp.base_recipe, runner.stage_overrides(exp, run, k, tmp_path, tmp_path / "latents"))


# parse_time against composer.core.Time.from_timestring: where a recipe reads a time string, it reads it as
# Composer does; where Composer reads more (signs, exponents, wall-clock, other units and cases), a recipe refuses.
SAME = ["100ba", "2ep", "1000sp", "5tok", "0ba", "0100ba", "0.5dur", "1dur", ".5dur", "1.0dur", "1.5dur"]
BOTH_REFUSE = ["abc", "ba", "dur", "5 b a", "5xyz", "1.5ba", "5ba5", "5ba ", "nanba", "0x10ba"]
NARROWER = ["-5ba", "+5ba", " 5ba", "3e4tok", "1_000ba", "2.0ba", "5BA", "5iter", "10sec", "1h2m3s", "5m", "5", "",
            "5.dur", "-0.5dur"]


@pytest.mark.slow  # imports Composer (seconds)
def test_the_duration_parser_agrees_with_composer():
    from composer.core import Time

    def composer(text: str) -> tuple[float, str] | None:
        try:
            t = Time.from_timestring(text)
        except (ValueError, TypeError, OverflowError):
            return None
        return t.value, t.unit.value

    for text in SAME:
        assert parse_time(text) == composer(text) and parse_time(text) is not None, text
    for text in BOTH_REFUSE:
        assert parse_time(text) is None and composer(text) is None, text
    for text in NARROWER:
        assert parse_time(text) is None and composer(text) is not None, text


def test_the_duration_parser_reads_what_the_recipes_write():
    assert [parse_time(t) for t in SAME[:4]] == [(100, "ba"), (2, "ep"), (1000, "sp"), (5, "tok")]
    assert parse_time("0.5dur") == (0.5, "dur") and all(parse_time(t) is None for t in BOTH_REFUSE + NARROWER)


def test_an_experiments_sampling_point_is_checked_as_a_recipes_samples_are(tmp_path):
    import yaml

    raw = yaml.safe_load((REPO / "recipes" / "experiments" / "masking.yaml").read_text())
    path = tmp_path / "masking.yaml"

    def load(change: dict) -> None:
        path.write_text(yaml.safe_dump({**raw, "eval": {**raw["eval"], "sampling": {**raw["eval"]["sampling"],
                                                                                    **change}}}))
        load_experiment(path)

    wrong = not_refused(load, [
        ({"sampler": "eulerr"}, r"eval.sampling.sampler: unknown sampler 'eulerr' \(allowed: ddim"),
        ({"sampler": "consistency"}, "eval.sampling.sampler: unknown sampler 'consistency'"),
        ({"steps": 0}, "eval.sampling.steps: must be a positive integer, got 0"),
        ({"guidance": 0.5}, "eval.sampling.guidance: must be a number >= 1, got 0.5")])
    assert not wrong, "\n".join(wrong)
