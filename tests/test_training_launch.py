"""Training through the real command line and launcher: kill and resume, and two CPU ranks with Composer's launcher."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import REPO, tiny_overrides, write_shards  # noqa: I001

from micro_diffusion.recipe import load_recipe
from micro_diffusion.training.builder import build_trainer
from micro_diffusion.training.run import plan_run

VENV_BIN = Path(sys.executable).parent
RESUME_ARGS = ["algorithms.ema={smoothing: 0.7, start: 1ba}", "scheduler={name: cosine_warmup, warmup: 2ba, "
               "alpha_f: 0.1}", "optimizer.lr=2e-3"]


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights and the EMA algorithm's stored copy from a Composer checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False)["state"]
    out = {f"model/{k}": v for k, v in state["model"].items()}
    ema = next(v for k, v in state["algorithms"] if k == "EMA")
    out.update({f"ema/{k}": v for k, v in ema["ema_model"]["named_parameters_dict"].items()})
    return out


def _wait_for_checkpoint(proc: subprocess.Popen, latest: Path, name: str, timeout: float = 240) -> None:
    start = time.time()
    while not (latest.exists() and os.path.realpath(latest).endswith(name)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before writing {name}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"no {name} after {timeout} s")
        time.sleep(0.02)


@pytest.mark.slow
def test_cli_run_killed_then_rerun_matches_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_shards(data / "latents", 96, prefix="t")
    args = tiny_overrides(data, tmp_path / "runs", steps=8, scheduler=None) + RESUME_ARGS + ["train.progress_bar=true"]
    command = [str(VENV_BIN / "micro-diffusion"), "train", "recipes/demo_masked.yaml", *args]
    latest = tmp_path / "runs" / "demo_masked" / "checkpoints" / "latest-rank0.pt"

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(proc, latest, "ep0-ba2-rank0.pt")
    proc.send_signal(signal.SIGKILL)  # a hard kill: no handler runs, nothing more is saved
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (latest.parent / "ep0-ba8-rank0.pt").exists()

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "8/8" in rerun.stderr and "%|" in rerun.stderr, "the CLI shows a progress bar"
    info = (tmp_path / "runs" / "demo_masked" / "config.yaml").read_text()
    assert "git_revision:" in info and "micro_diffusion_version:" in info and "max_duration: 8ba" in info

    cfg = load_recipe(REPO / "recipes" / "demo_masked.yaml", tiny_overrides(data, tmp_path / "ref", steps=8,
                                                                            scheduler=None) + RESUME_ARGS)
    reference = build_trainer(cfg, plan_run(cfg))
    reference.fit()
    reference.close()
    resumed = _checkpoint_weights(latest.parent / "ep0-ba8-rank0.pt")
    straight = _checkpoint_weights(tmp_path / "ref" / "demo_masked" / "checkpoints" / "ep0-ba8-rank0.pt")
    assert resumed.keys() == straight.keys() and any(k.startswith("ema/") for k in resumed)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, rtol=1e-5, atol=1e-6), key
    first = _checkpoint_weights(latest.parent / "ep0-ba2-rank0.pt")
    assert any(not torch.allclose(first[k], v) for k, v in straight.items()), "training must have moved the weights"


RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from composer.core import Callback
from composer.utils import dist
from micro_diffusion.training.builder import build_trainer
from micro_diffusion.recipe import load_recipe
from micro_diffusion.training.run import plan_run

class RecordIds(Callback):
    def __init__(self):
        self.ids = []
    def after_dataloader(self, state, logger):
        self.ids.extend(state.batch["id"])
    def fit_end(self, state, logger):
        with open(os.path.join({out!r}, f"ids_rank{{dist.get_global_rank()}}.json"), "w") as f:
            json.dump({{"ids": self.ids, "world": dist.get_world_size(), "batch": int(state.timestamp.batch),
                        "sample": int(state.timestamp.sample)}}, f)

cfg = load_recipe({recipe!r}, sys.argv[1:])
plan = plan_run(cfg)
trainer = build_trainer(cfg, plan, callbacks=[RecordIds()])
trainer.fit()
trainer.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_composer_launcher_two_cpu_ranks_see_disjoint_samples(tmp_path):
    data = tmp_path / "data"
    write_shards(data / "latents", 64, prefix="t")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path),
                                         recipe=str(REPO / "recipes" / "demo_masked.yaml")))
    args = tiny_overrides(data, tmp_path / "runs", steps=3) + ["train.device_microbatch=2"]
    out = subprocess.run([str(VENV_BIN / "composer"), "-n", "2", "--master_port", str(_free_port()),
                          "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
                          str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=400)
    logs = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("rank*.err")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + logs
    ranks = [json.loads((tmp_path / f"ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["batch"] == 3 for r in ranks)
    assert ranks[0]["sample"] == 3 * 8, "the global batch stays 8 whatever the device count"
    ids0, ids1 = set(ranks[0]["ids"]), set(ranks[1]["ids"])
    assert len(ranks[0]["ids"]) == len(ids0) == 3 * 4 and len(ids1) == 3 * 4, "per-device batch = global / 2"
    assert not ids0 & ids1, "each rank must train on different samples"
    assert (tmp_path / "runs" / "demo_masked" / "checkpoints" / "ep0-ba3-rank0.pt").exists()
