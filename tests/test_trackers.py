"""Experiment trackers named in a recipe (`loggers:`): the block's checks, and a real run read back by each tracker."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
from tiny_runs import MINILM_DIM, REPO, tiny_overrides, write_sampling_shards  # noqa: I001

from micro_diffusion.cli import main as cli
from micro_diffusion.recipe import LOGGERS, RecipeError, load_recipe, parse_overrides
from micro_diffusion.utils.run_folder import METRICS, MLRUNS, TENSORBOARD, WANDB

# the block as a user writes it (docs/trackers.md)
BLOCK = """
loggers:
  mlflow: {tracking_uri: null, experiment_name: micro-diffusion}
  tensorboard: {log_dir: null}
  wandb: {project: micro-diffusion, entity: null, name: null, tags: []}
"""
LOSS, COST, VAL = "loss/train/total", "cost/usd", "val/loss"
LR, SPEED = "lr-AdamW/group0", "throughput/samples_per_sec"  # Composer's LRMonitor and SpeedMonitor


def write_recipe(folder: Path, body: str) -> Path:
    path = folder / "tracked.yaml"
    path.write_text("base: demo_masked.yaml\n" + body)
    return path


def test_the_block_fills_each_trackers_options(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path, BLOCK))
    assert sorted(cfg["loggers"]) == ["mlflow", "tensorboard", "wandb"]
    assert cfg["loggers"]["wandb"]["project"] == "micro-diffusion" and cfg["loggers"]["wandb"]["tags"] == []
    assert cfg["loggers"]["tensorboard"] == {"log_dir": None, "flush_interval": 100}
    assert load_recipe("demo_masked.yaml")["loggers"] == {}  # none unless asked
    assert load_recipe(write_recipe(tmp_path, "loggers: {}\n"))["loggers"] == {}
    off = load_recipe(write_recipe(tmp_path, BLOCK), {"loggers.wandb": None})  # null switches a base file's off
    assert sorted(off["loggers"]) == ["mlflow", "tensorboard"]


def test_every_option_is_a_parameter_of_composers_logger():
    from composer.loggers import MLFlowLogger, TensorboardLogger, WandBLogger

    classes = {"mlflow": MLFlowLogger, "tensorboard": TensorboardLogger, "wandb": WandBLogger}
    assert set(classes) == set(LOGGERS)
    for name, options in LOGGERS.items():
        assert set(options) <= set(inspect.signature(classes[name]).parameters), name


@pytest.mark.parametrize("body,key,allowed", [
    ("loggers: {neptune: {project: x}}\n", "loggers.neptune", "mlflow, tensorboard, wandb"),
    ("loggers: {wandb: {projekt: x}}\n", "loggers.wandb.projekt", "entity, group, name, project, tags"),
    ("loggers: {mlflow: {log_dir: x}}\n", "loggers.mlflow.log_dir", "experiment_name, log_system_metrics"),
    ("loggers: {tensorboard: {log_dir: 7}}\n", "loggers.tensorboard.log_dir", "text or null"),
    ("loggers: {wandb: {tags: [1]}}\n", "loggers.wandb.tags", "list of text"),
    ("loggers: [wandb]\n", "loggers", "mlflow, tensorboard, wandb"),
])
def test_a_bad_block_is_one_line_naming_the_key_in_a_dry_run(body, key, allowed, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, body)
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(path)
    code = cli(["train", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert key in err and allowed in err, err


def test_the_resolved_recipe_flattens_to_dotted_hyperparameters(tmp_path):
    from micro_diffusion.training.trackers import flatten

    cfg = load_recipe(write_recipe(tmp_path, BLOCK))
    flat = flatten(cfg)
    assert flat["model.preset"] == cfg["model"]["preset"] and flat["optimizer.lr"] == cfg["optimizer"]["lr"]
    assert json.loads(flat["data.streams"]) == cfg["data"]["streams"]
    assert flat["loggers.wandb.entity"] == "null" and flat["eval.interval"] == "null"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_an_experiment_names_trackers_for_every_run(tmp_path):
    from micro_diffusion.experiments.plan import plan_runs
    from micro_diffusion.experiments.runner import stage_overrides
    from micro_diffusion.experiments.spec import load_experiment

    source = (REPO / "recipes" / "experiments" / "masking.yaml").read_text()
    path = tmp_path / "masking.yaml"
    path.write_text(source.replace("base_recipe: ../", f"base_recipe: {REPO / 'recipes'}/") + BLOCK)
    exp = load_experiment(path, quick=True)
    run = plan_runs(exp, [0])[0]
    given = stage_overrides(exp, run, 0, tmp_path, tmp_path / "latents")["loggers"]
    cfg = load_recipe(exp.base_recipe, {**run.stages[0].overrides, "loggers": given})
    assert cfg["loggers"]["wandb"]["name"] == f"{run.name}-stage0" and cfg["loggers"]["wandb"]["group"] == "masking"
    assert cfg["loggers"]["mlflow"]["tracking_uri"] == (tmp_path / "mlruns").resolve().as_uri()
    path.write_text(path.read_text().replace("tensorboard: {log_dir: null}", "tensorboard: {logdir: x}"))
    with pytest.raises(RecipeError, match="loggers.tensorboard.logdir"):
        load_experiment(path)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    """Shards whose encoders can sample: a tiny local VAE (16 px images) and the packaged MiniLM's caption width."""
    return write_sampling_shards(tmp_path_factory.mktemp("sample"))


def read_wandb(run_dir: Path) -> tuple[list[dict], dict, list[Path]]:
    """The offline W&B run in the run folder, read with wandb's own record reader: its history rows, its config and
    its image files."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    (offline,) = (run_dir / WANDB).glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(log))
    history, config = [], {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict = {}
            for item in record.history.item:  # a logged image's fields come as nested keys (name, field)
                *path, last = [item.key] if item.key else list(item.nested_key)
                node = row
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = json.loads(item.value_json)
            history.append(row)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config, sorted((offline / "files" / "media" / "images").rglob("*.png"))


def tensorboard_hparams(folder: Path) -> dict:
    """The hyperparameters of TensorBoard's HPARAMS entry (its plugin data in the event files of `folder`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(folder))
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(HParamsPluginData.FromString(start).session_start_info.hparams)


def assert_series(got: list[tuple[int, float]], want: list[tuple[int, float]], key: str) -> None:
    """The same steps and, up to float32 rounding, the same values as metrics.jsonl."""
    assert [step for step, _ in got] == [step for step, _ in want], key
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6), key


@pytest.mark.slow
def test_a_run_reaches_mlflow_tensorboard_and_wandb(sample_root, tmp_path, monkeypatch):
    """Four real steps with all three trackers on, offline; each tracker's own reader finds the loss, a cost figure,
    the validation loss, a sample grid and the recipe."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    from micro_diffusion.training import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "0")
    recipe = write_recipe(tmp_path, BLOCK)
    # the demo's warmup schedule: the learning rate changes every step (MLflow's logger skips repeated values)
    given = tiny_overrides(sample_root, tmp_path / "runs", steps=4, scheduler=None) + [
        f"model.caption_dim={MINILM_DIM}", "stage=tracked", "stages=[]", "data.val_streams=[{local: latents}]",
        "eval.interval=2ba", "eval.batches=1", "eval.batch_size=4", "samples.interval=4ba", "samples.steps=2",
        "samples.prompts=[a red square, a blue circle]", "loggers.mlflow.log_system_metrics=false",
        "train.log_interval=2ba"]  # throughput over 2 batches: logged at batches 3 and 4
    run = train(recipe, parse_overrides(given))
    rows = [json.loads(line) for line in (run.run_dir / METRICS).read_text().splitlines()]
    logged = {key: [(row["step"], row[key]) for row in rows if key in row] for key in (LOSS, COST, VAL, LR, SPEED)}
    assert len(logged[LOSS]) == len(logged[LR]) == 4 and len(logged[VAL]) == len(logged[SPEED]) == 2
    assert logged[COST][-1][1] > 0 and logged[SPEED][-1][1] > 0  # what every tracker must hold

    client = MlflowClient((run.run_dir / MLRUNS).resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("micro-diffusion").experiment_id])
    for key, pairs in logged.items():
        history = client.get_metric_history(found.info.run_id, key)
        assert_series([(m.step, m.value) for m in history], pairs, key)
    assert found.data.params["model.caption_dim"] == str(MINILM_DIM) and found.info.status == "FINISHED"
    images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert any("samples" in p and p.endswith(".png") for p in images), images

    events = EventAccumulator(str(run.run_dir / TENSORBOARD / "tracked"), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    for key, pairs in logged.items():
        assert_series([(e.step, e.value) for e in events.Scalars(key)], pairs, key)
    (grid,) = events.Images("samples/raw")
    assert grid.step == 4 and (grid.width, grid.height) == (32, 16)  # two 16 px images side by side
    hparams = tensorboard_hparams(run.run_dir / TENSORBOARD / "tracked" / "tracked")
    assert hparams["model.caption_dim"].number_value == MINILM_DIM and hparams["optimizer.lr"].number_value == 1e-3

    history, config, pngs = read_wandb(run.run_dir)
    for key, pairs in logged.items():
        assert_series([(row["_step"], row[key]) for row in history if key in row], pairs, key)
    (grid,) = [row["samples/raw"] for row in history if "samples/raw" in row]
    assert grid["_type"] == "images/separated" and grid["width"] == 32 and len(pngs) == 1
    assert config["model.caption_dim"] == MINILM_DIM and config["model.preset"] == "MicroDiT_Tiny_2"


def test_a_tracker_without_its_package_is_an_error_naming_it(monkeypatch, tmp_path):
    from micro_diffusion.training.trackers import build_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as in an environment without it
    cfg = load_recipe(write_recipe(tmp_path, BLOCK))
    with pytest.raises(RecipeError, match=r"loggers\.wandb: the wandb package is not installed"):
        build_trackers({"wandb": cfg["loggers"]["wandb"]}, tmp_path / "run")
