"""The dry run's memory model: its arithmetic on hand-made numbers, the activation probe, the printed prediction."""
from __future__ import annotations

import re

import pytest
import torch

from benchmarks.common import LiveTensorPeak
from micro_diffusion.cli import main
from micro_diffusion.cost.memory import (
    MemoryEstimate,
    activation_bytes_per_sample,
    saved_bytes,
    saved_parts,
    state_bytes,
)
from micro_diffusion.models import create_dit

TINY = dict(width=64, depth=3, head_dim=16, patch_mixer_depth=1, patch_mixer_width=64)
TINY_RECIPE = ["model.overrides={width: 64, depth: 3, head_dim: 16, patch_mixer_depth: 1, patch_mixer_width: 64}",
               "model.caption_dim=32", "model.caption_len=8", "data.resolution=64"]


def test_state_bytes_shard_what_fsdp_shards():
    assert state_bytes(1000, 8, "fsdp") == (2000 + 500, 2000 + 500, 1000)  # bf16 whole + fp32 / 8; Adam / 8
    assert state_bytes(1000, 1, "none") == (4000 + 2000, 4000, 8000)  # fp32 + autocast's bf16 copies; Adam whole
    assert state_bytes(1000, 4, "ddp") == state_bytes(1000, 1, "none")
    with pytest.raises(ValueError, match="zero"):
        state_bytes(1000, 8, "zero")
    with pytest.raises(ValueError, match="devices"):
        state_bytes(1000, 0, "fsdp")


def test_totals_and_the_largest_microbatch_that_fits():
    est = MemoryEstimate(params=5, devices=8, parallelism="fsdp", weights=10, gradients=10, optimizer=5,
                         activations_per_sample=3, microbatch=4, runtime=2)
    assert est.activations == 12 and est.total == 2 + 10 + 10 + 5 + 12
    assert est.largest_microbatch(40) == 4  # (40 - 27) // 3
    assert est.largest_microbatch(28) == 0 and est.largest_microbatch(30) == 1
    assert est.to_dict()["total"] == 39


def test_probe_counts_per_sample_bytes_that_grow_with_tokens():
    net = create_dit("MicroDiT_Tiny_2", latent_size=16, caption_dim=32, **TINY)
    masked = activation_bytes_per_sample(net, 16, (8, 32), 0.75)
    full = activation_bytes_per_sample(net, 16, (8, 32), 0.0)
    assert 0 < masked < full
    # what two samples save beyond one is what four save beyond three, less than 5% apart: it scales linearly
    steps = [saved_bytes(net, n, 16, (8, 32), 0.0, fused=True) for n in (1, 2, 3, 4)]
    assert steps[1] - steps[0] == pytest.approx(steps[3] - steps[2], rel=0.05)
    # the plain path saves the (T x T) scores the fused kernel never keeps
    assert activation_bytes_per_sample(net, 16, (8, 32), 0.0, fused=False) > full


def test_probe_counts_what_autograd_saves_without_keeping_it():
    net = create_dit("MicroDiT_Tiny_2", latent_size=32, caption_dim=32, **TINY)
    with LiveTensorPeak() as live:
        parts = saved_parts(net, 4, 32, (8, 32), 0.0, fused=False)
    # the probe's own peak stays far below what it counted as saved: the saved tensors were let go at once (the
    # XL probes at 512 px otherwise held every activation and ran out of memory)
    assert parts.total > 3 * live.peak
    assert parts == saved_parts(net, 4, 32, (8, 32), 0.0, fused=False)  # the same count, run after run


def dry_run(tmp_path, *extra: str) -> list[str]:
    return ["train", "recipes/res256_masked.yaml", f"runs_root={tmp_path}", *TINY_RECIPE, *extra, "--dry-run"]


def test_dry_run_prints_memory_and_time_and_warns_on_a_microbatch_too_large(tmp_path, capsys):
    assert main([*dry_run(tmp_path), "--devices", "8"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("# predicted on 8 x h100 (fsdp, microbatch 256"))
    found = re.search(r"peak ([\d.]+) GiB per device = weights ([\d.]+) \+ gradients ([\d.]+) \+ optimizer "
                      r"([\d.]+) \+ activations ([\d.]+) \(", line)
    total, *parts = (float(v) for v in found.groups())
    assert total == pytest.approx(sum(parts), abs=0.02) and total > 0 and "WARNING" not in out
    assert re.search(r"# predicted step [\d.e+-]+ s, stage 250000 steps: [\d.e+-]+ h wall-clock at 40%", out)
    assert main([*dry_run(tmp_path, "train.device_microbatch=1048576", "train.global_batch=8388608"), "--devices", "8",
                 "--device-type", "a10g"]) == 0
    warning = next(x for x in capsys.readouterr().out.splitlines() if "WARNING" in x)
    largest = int(re.search(r"the largest that fits is (\d+)", warning).group(1))
    assert 0 < largest < 1048576 and "a10g's 22.0 GiB" in warning


def test_predictions_outside_what_the_model_covers_are_refused(tmp_path, capsys):
    assert main(["train", "recipes/res256_masked.yaml", f"runs_root={tmp_path}", "--devices", "8"]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert main([*dry_run(tmp_path), "--devices", "8", "--mfu", "1.5"]) == 2
    assert "--mfu in (0, 1], got 8 and 1.5" in capsys.readouterr().err
    assert main(["train", "recipes/distill_512.yaml", f"runs_root={tmp_path}", "--dry-run", "--devices", "8"]) == 2
    assert "distillation" in capsys.readouterr().err


def test_probe_follows_routes_in_training_mode_whatever_mode_it_is_handed():
    def per_sample(routes: tuple = (), eval_mode: bool = False) -> float:
        torch.manual_seed(0)
        net = create_dit("MicroDiT_Tiny_2", latent_size=16, caption_dim=32, routes=routes,
                         **{**TINY, "depth": 6, "patch_mixer_depth": 0})
        net.train(not eval_mode)
        out = activation_bytes_per_sample(net, 16, (8, 32), 0.0)
        assert net.training is not eval_mode  # the caller's mode comes back
        return out

    full = per_sample()
    saved = {r: full - per_sample(((1, 4, r),)) for r in (0.25, 0.5, 0.75)}
    assert 0 < saved[0.25] < saved[0.5] < saved[0.75] < full
    # the bytes a route saves grow linearly with the tokens it routes and with the blocks it spans
    assert saved[0.75] - saved[0.5] == pytest.approx(saved[0.5] - saved[0.25], rel=0.02)
    assert saved[0.5] == pytest.approx(2 * (full - per_sample(((1, 2, 0.5),))), rel=0.05)
    # a network handed over in eval mode is probed as it trains: routed
    assert per_sample(((1, 4, 0.5),), eval_mode=True) == full - saved[0.5]
