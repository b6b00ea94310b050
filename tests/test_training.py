"""Composer training on real latent shards: two stages, optimizer/schedule read-back, EMA, NaN guard, preemption."""
from __future__ import annotations

import copy
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from composer.algorithms import EMA, GradientClipping
from composer.core import Callback
from PIL import Image
from tiny_runs import REPO, tiny_overrides, write_shards  # noqa: I001

from micro_diffusion.cli import main as cli
from micro_diffusion.diffusion.edm import EDMPrecond
from micro_diffusion.diffusion.sampling import SamplingSettings, generate_latents, image_seeds
from micro_diffusion.recipe import load_recipe
from micro_diffusion.training.builder import build_trainer, moe_parameters
from micro_diffusion.training.callbacks import NonFiniteLossError, Preemption
from micro_diffusion.training.export import export_run
from micro_diffusion.training.monitor import SampleGrid, ValidationLoss, image_grid
from micro_diffusion.training.run import check_inputs, plan_run, run_info, write_run_info


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_shards(root / "latents", 96, prefix="t", seed=0)
    write_shards(root / "val", 16, prefix="v", seed=1)
    return root


def trainer_for(recipe: str, data_root: Path, runs: Path, *extra: str, callbacks=None, write_info=False, **kw):
    cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", tiny_overrides(data_root, runs, **kw) + list(extra))
    plan = plan_run(cfg)
    check_inputs(cfg, plan)
    if write_info:  # config.yaml, as `micro-diffusion train` writes it before training: export reads it
        write_run_info(run_info(cfg, plan), plan.run_dir)
    return build_trainer(cfg, plan, callbacks=callbacks), plan


def raw_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.state.model
    with model.weights(use_ema=False):
        return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


class Probe(Callback):
    """Records learning rates, post-clipping gradient norms and sample ids per batch."""

    def __init__(self):
        self.lrs, self.grad_norms, self.ids = [], [], []

    def after_train_batch(self, state, logger):
        grads = [p.grad.norm() for p in state.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(grads).norm()))
        self.lrs.append([g["lr"] for g in state.optimizers[0].param_groups])

    def after_dataloader(self, state, logger):
        self.ids.append(list(state.batch["id"]))


@pytest.mark.slow
def test_two_stages_masked_then_unmasked_loss_goes_down(data_root, tmp_path):
    val = ["data.val_streams=[{local: val}]", "eval.interval=3ba", "eval.batches=2", "eval.batch_size=8",
           "optimizer.lr=2e-3"]
    t1, plan1 = trainer_for("demo_masked", data_root, tmp_path, *val, steps=12)
    assert t1.state.model.mask_ratio == 0.75
    t1.fit()
    v1 = next(cb for cb in t1.state.callbacks if isinstance(cb, ValidationLoss)).history
    assert [b for b, _ in v1] == [3, 6, 9, 12]
    losses1 = [v for _, v in v1]
    assert all(b < a for a, b in zip(losses1, losses1[1:], strict=False)) and losses1[-1] < 0.95 * losses1[0], v1
    weights1 = raw_state(t1)
    t1.close()
    assert (Path(plan1.save_folder) / "latest-rank0.pt").exists() and (Path(plan1.run_dir) / "config.yaml").exists() \
        is False  # config.yaml is the CLI's job; the builder writes only checkpoints and metrics
    lines = (Path(plan1.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 12 and '"val/loss"' in "".join(lines)

    t2, plan2 = trainer_for("demo_finetune", data_root, tmp_path, *val, steps=3)
    assert plan2.init_checkpoint == str(Path(plan1.save_folder) / "latest-rank0.pt")
    loaded = raw_state(t2)
    assert all(torch.equal(loaded[k], weights1[k]) for k in weights1), "stage 2 must start from stage 1's weights"
    assert t2.state.optimizers[0].state == {}, "the optimizer must start fresh"
    assert t2.state.model.mask_ratio == 0.0
    t2.fit()
    v2 = next(cb for cb in t2.state.callbacks if isinstance(cb, ValidationLoss)).history
    assert v2[-1][1] < v1[-1][1], (v1, v2)
    t2.close()


def test_every_recipe_scheduler_and_algorithm_has_a_builder():
    from micro_diffusion.recipe import ALGORITHMS, SCHEDULERS
    from micro_diffusion.training.builder import ALGORITHM_BUILDERS, SCHEDULER_BUILDERS

    assert set(SCHEDULER_BUILDERS) == set(SCHEDULERS) and set(ALGORITHM_BUILDERS) == set(ALGORITHMS)


@pytest.mark.slow
def test_moe_group_clipping_and_schedules_read_back(data_root, tmp_path):
    probe = Probe()
    t, _ = trainer_for("res256_masked", data_root, tmp_path, "scheduler.warmup=4ba", "optimizer.lr=1e-3",
                       "algorithms.gradient_clipping.threshold=0.01", callbacks=[probe], steps=8, scheduler=None)
    opt = t.state.optimizers[0]
    dense, moe = opt.param_groups
    assert {id(p) for p in moe["params"]} == {id(p) for p in moe_parameters(t.state.model.net)} and moe["params"]
    assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.1)
    clip = [a for a in t.state.algorithms if isinstance(a, GradientClipping)]
    assert len(clip) == 1 and (clip[0].clipping_type, clip[0].clipping_threshold) == ("norm", 0.01)
    t.fit()
    t.close()
    for batch, (lr_dense, lr_moe) in enumerate(probe.lrs):
        step = max(batch - 1, 0)  # Composer steps its schedulers before advancing the timestamp: batch k uses t=k-1
        frac = (step - 4) / (8 - 4)
        expected = 1e-3 * (step / 4 if step < 4 else 0.33 + 0.67 * 0.5 * (1 + math.cos(math.pi * frac)))
        assert lr_dense == pytest.approx(expected, rel=1e-6), (step, probe.lrs)
        assert lr_moe == pytest.approx(0.5 * lr_dense, rel=1e-9)
    assert max(probe.grad_norms) <= 0.01 * 1.001

    probe = Probe()
    t, _ = trainer_for("res512_masked", data_root, tmp_path / "s3", "init_from=null", "stages=[]",
                       "scheduler.warmup=3ba", "optimizer.lr=1e-3", "data.streams=[{local: latents}]",
                       "data.resolution=64", callbacks=[probe], steps=5, scheduler=None)
    t.fit()
    t.close()
    assert [lr[0] for lr in probe.lrs] == pytest.approx([0.0, 0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])


@pytest.mark.slow
def test_ema_runs_and_sampling_uses_it(data_root, tmp_path):
    t, _ = trainer_for("demo_masked", data_root, tmp_path, "algorithms.ema={smoothing: 0.8, start: 2ba}",
                       "optimizer.lr=3e-3", steps=6)
    model = t.state.model
    ema = next(a for a in t.state.algorithms if isinstance(a, EMA))
    assert model.ema is ema
    t.fit()
    assert model.ema_active()
    raw = raw_state(t)
    with model.weights(use_ema=True):
        ema_net = copy.deepcopy(model.net)
    diff = max((ema_net.state_dict()[k] - raw[k]).abs().max().item() for k in raw)
    assert diff > 1e-4, "EMA weights must differ from the raw weights after training"

    emb, null, seeds = torch.randn(2, 8, 32), torch.zeros(8, 32), image_seeds(5, range(2))
    settings = SamplingSettings(steps=3, guidance=2.0)
    model.eval()
    with model.weights(use_ema=True):
        x_ema = generate_latents(model.denoiser, emb, null, settings, seeds, (4, 8, 8))
    with model.weights(use_ema=False):
        x_raw = generate_latents(model.denoiser, emb, null, settings, seeds, (4, 8, 8))
    expected = generate_latents(EDMPrecond(ema_net.eval(), 0.9), emb, null, settings, seeds, (4, 8, 8))
    assert torch.allclose(x_ema, expected, atol=1e-5) and not torch.allclose(x_ema, x_raw, atol=1e-4)
    assert all(torch.equal(raw[k], v) for k, v in raw_state(t).items()), "weights(...) must restore the weights"
    grid = image_grid(torch.tanh(x_ema[:, :3]))
    assert grid.shape == (8, 16, 3) and grid.dtype.name == "uint8"
    t.close()


class PoisonBatch(Callback):
    """Turns the latents of one batch into NaN, as a diverged step would."""

    def __init__(self, at_batch: int):
        self.at_batch = at_batch

    def before_forward(self, state, logger):
        if int(state.timestamp.batch) == self.at_batch:
            state.batch["latents"] = torch.full_like(state.batch["latents"], float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    t, plan = trainer_for("demo_masked", data_root, tmp_path, callbacks=[PoisonBatch(3)], steps=6)
    before = None

    class Snapshot(Callback):
        def batch_end(self, state, logger):
            nonlocal before
            before = raw_state(t)

    t.state.callbacks.append(Snapshot())
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .* at batch 3 .*ep0-ba2-rank0\.pt"):
        t.fit()
    folder = Path(plan.save_folder)
    assert sorted(p.name for p in folder.glob("ep*")) == ["ep0-ba2-rank0.pt"]
    assert os.path.realpath(folder / "latest-rank0.pt").endswith("ep0-ba2-rank0.pt")
    after = raw_state(t)
    assert all(torch.isfinite(v).all() and torch.equal(v, before[k]) for k, v in after.items()), \
        "the poisoned step must not touch the weights"
    t.close()


class SendSigterm(Callback):
    def __init__(self, at_batch: int):
        self.at_batch = at_batch

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.at_batch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(data_root, tmp_path):
    probe = Probe()
    t, plan = trainer_for("demo_masked", data_root, tmp_path, callbacks=[SendSigterm(2), probe], steps=6)
    t.fit()
    preempt = next(cb for cb in t.state.callbacks if isinstance(cb, Preemption))
    assert preempt.stopped_at == 3 and int(t.state.timestamp.batch) == 3
    t.close()
    assert signal.getsignal(signal.SIGTERM) is not preempt._handler, "the handler must be restored"
    folder = Path(plan.save_folder)
    assert os.path.realpath(folder / "latest-rank0.pt").endswith("ep0-ba3-rank0.pt")  # not on the 2-batch interval

    probe2 = Probe()
    t2, _ = trainer_for("demo_masked", data_root, tmp_path, callbacks=[probe2], steps=6)
    t2.fit()
    assert int(t2.state.timestamp.batch) == 6 and len(probe2.ids) == 3
    seen = [i for batch in probe.ids + probe2.ids for i in batch]
    assert len(seen) == len(set(seen)) == 48, "the resumed run continues the epoch where the first stopped"
    t2.close()


@pytest.mark.slow
def test_train_step_returns_its_run_and_a_sigterm_raises_preempted(data_root, tmp_path, monkeypatch, capsys):
    """training.train/dry_run as the demo and experiments call them: a dict of overrides in, a Run (or an error) out."""
    from micro_diffusion import training
    from micro_diffusion.errors import Preempted
    from micro_diffusion.recipe import parse_overrides
    from micro_diffusion.training import builder

    overrides = parse_overrides(tiny_overrides(data_root, tmp_path / "runs", steps=6))
    out = tmp_path / "run"
    plan = training.dry_run("demo_masked.yaml", overrides, out)  # found in the repository's recipes/
    assert f"run_dir: {out}" in plan and "# all inputs found" in plan and not out.exists()
    build = builder.build_trainer
    monkeypatch.setattr(builder, "build_trainer", lambda cfg, plan: build(cfg, plan, callbacks=[SendSigterm(2)]))
    with pytest.raises(Preempted, match=f"checkpoint saved at batch 3 in {out / 'checkpoints'}"):
        training.train("demo_masked.yaml", overrides, out)
    capsys.readouterr()
    strings = tiny_overrides(data_root, tmp_path / "runs", steps=6)
    assert cli(["train", "demo_masked.yaml", *strings, "--out", str(tmp_path / "cli")]) == Preempted.exit_code == 143
    assert "micro-diffusion train: preempted: checkpoint saved at batch 3" in capsys.readouterr().err
    monkeypatch.undo()
    run = training.train("demo_masked.yaml", overrides, out)  # the rerun resumes and finishes
    assert isinstance(run, training.Run) and run.run_dir == out and run.stage == "demo_masked"
    assert Path(run.checkpoint) == out / "checkpoints" / "latest-rank0.pt"
    assert os.path.realpath(run.checkpoint).endswith("ep0-ba6-rank0.pt")
    assert run.stage_totals.samples == 6 * 8 and run.totals.samples == run.stage_totals.samples
    with pytest.raises(SystemExit) as stop:
        cli(["train", "demo_masked.yaml", "--run-dir", str(out)])
    assert stop.value.code == 2 and "use --out" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_grids_from_the_datasets_encoders(tmp_path):
    """Prompts encoded once with the text encoder of encoders.json, grids decoded with its VAE, raw and EMA."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    write_shards(tmp_path / "data" / "latents", 32, cap_d=384, vae=str(tmp_path / "vae"), text_encoder="minilm")
    t, plan = trainer_for("demo_masked", tmp_path / "data", tmp_path / "runs", "model.caption_dim=384",
                          "samples.interval=2ba", "samples.steps=2", "samples.prompts=[a red fox, a blue boat]",
                          "algorithms.ema={smoothing: 0.5, start: 1ba}", steps=4, write_info=True)
    grid = next(cb for cb in t.state.callbacks if isinstance(cb, SampleGrid))
    assert tuple(grid.prompt_emb.shape) == (2, 8, 384)
    t.fit()
    t.close()
    names = sorted(p.name for p in (Path(plan.run_dir) / "samples").iterdir())
    assert names == ["ba2.png", "ba2_ema.png", "ba4.png", "ba4_ema.png"]
    with Image.open(Path(plan.run_dir) / "samples" / "ba4.png") as img:
        assert img.size == (32, 16)  # two 16 px images (8x8 latents, a 2x VAE) side by side

    # image k of the last grid is image k of `micro-diffusion sample` on the exported run, same seed and weights
    model_dir = export_run(plan.run_dir, tmp_path / "model")
    for weights in ("raw", "ema"):
        out = tmp_path / f"sampled_{weights}"
        assert cli(["sample", str(model_dir), "--prompt", "a red fox", "--prompt", "a blue boat",
                    "--steps", "2", "--seed", "0", f"--{weights}", "--save-latents", "--out", str(out)]) == 0
        sampled = torch.from_numpy(np.load(out / "latents.npy"))
        assert sampled.shape == grid.latest[weights].shape == (2, 4, 8, 8)
        assert torch.allclose(sampled, grid.latest[weights], atol=1e-5), weights
    assert not torch.allclose(grid.latest["raw"], grid.latest["ema"], atol=1e-3)
