"""TREAD and SPRINT through a real Composer Trainer.fit (the shared builder, ledger and export), beside masking."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import REPO, tiny_overrides, write_shards  # noqa: I001

from micro_diffusion.cost.flops import forward_flops, train_flops_per_sample
from micro_diffusion.cost.ledger import last_totals
from micro_diffusion.recipe import build_network, parse_overrides

# The test recipe's network without a patch-mixer, as TREAD and SPRINT run (tiny_runs.TINY_MODEL has 3 blocks).
METHODS = {
    "tread": ["model.overrides={width: 64, depth: 3, head_dim: 16, patch_mixer_depth: 0, routes: [[0, 1, 0.5]]}",
              "diffusion.mask_ratio=0.0"],
    "sprint": ["model.overrides={width: 64, depth: 3, head_dim: 16, patch_mixer_depth: 0, sprint_encoder_depth: 1, "
               "sprint_decoder_depth: 1}", "diffusion.mask_ratio=0.75"],
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shards(root / "latents", 32, seed=0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_trainer_fit_and_export_with_each_method(method, data_root, tmp_path):
    """Four real steps: finite losses, the ledger charges the method's FLOPs per sample, and the export loads."""
    from micro_diffusion import load_exported
    from micro_diffusion.training import train
    from micro_diffusion.training.export import export_run

    given = tiny_overrides(data_root, tmp_path / "runs", steps=4) + METHODS[method] + [f"stage=tiny_{method}",
                                                                                       "stages=[]"]
    run = train(REPO / "recipes" / "demo_masked.yaml", parse_overrides(given))
    losses = [r["loss/train/total"] for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss/train/total" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    with torch.device("meta"):
        net = build_network(run.recipe)
    per_sample = train_flops_per_sample(net, 8, run.recipe["model"]["caption_len"],
                                        run.recipe["diffusion"]["mask_ratio"])
    totals = last_totals(run.run_dir)
    assert totals is not None and totals[0].flops == pytest.approx(4 * 8 * per_sample)
    # cheaper than the same network's unreduced training sample: every token through every block
    full = 3 * forward_flops(net, 8, run.recipe["model"]["caption_len"], 0.0, training=False)
    assert per_sample < full
    loaded, config, _ = load_exported(export_run(run.run_dir, tmp_path / "model"))
    assert config["network"]["routes" if method == "tread" else "sprint_encoder_depth"] in ([[0, 1, 0.5]], 1)
    assert set(loaded.state_dict()) == set(net.state_dict())
