"""Every subcommand answers bad input with one line on stderr, its documented exit code, no traceback and nothing new
on disk (docs/reliability.md). Each case runs as a real subprocess in a folder of small fixtures."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CLI = ("-m", "micro_diffusion.cli")
USAGE, DAMAGED = 2, 4  # docs/exit-codes.md

# (id, argv after python, expected exit code, substrings the one stderr line must hold). Paths are relative to the
# fixture folder: `export` (a tiny diffusion model without EMA), `export-no-vae` (the same, its VAE folder gone),
# `empty` (an empty folder), `images` (two PNGs), `taken` (a folder with a file), `afile.txt` (a file).
CASES: list[tuple[str, tuple[str, ...], int, tuple[str, ...]]] = [
    ("sample-missing-model", (*CLI, "sample", "nope", "--prompt", "a", "--out", "out"), USAGE, ("nope",)),
    ("sample-empty-model", (*CLI, "sample", "empty", "--prompt", "a", "--out", "out"), USAGE, ("empty",)),
    ("sample-steps-0", (*CLI, "sample", "export", "--prompt", "a", "--steps", "0", "--out", "out"), USAGE,
     ("--steps", "0")),
    ("sample-steps-neg", (*CLI, "sample", "export", "--prompt", "a", "--steps", "-5", "--out", "out"), USAGE,
     ("--steps", "-5")),
    ("sample-no-prompt", (*CLI, "sample", "export", "--out", "out"), USAGE, ("--prompt",)),
    ("sample-batch-0", (*CLI, "sample", "export", "--prompt", "a", "--batch-size", "0", "--out", "out"), USAGE,
     ("--batch-size", "0")),
    ("sample-ema-absent", (*CLI, "sample", "export", "--prompt", "a", "--ema", "--out", "out"), USAGE,
     ("--ema", "export")),
    ("sample-consistency", (*CLI, "sample", "export", "--prompt", "a", "--sampler", "consistency", "--out", "out"),
     USAGE, ("consistency", "export")),
    ("sample-prompts-missing", (*CLI, "sample", "export", "--prompts", "nope.txt", "--out", "out"), USAGE,
     ("nope.txt",)),
    ("sample-out-file", (*CLI, "sample", "export", "--prompt", "a", "--out", "afile.txt"), USAGE, ("afile.txt",)),
    ("sample-missing-encoder", (*CLI, "sample", "export-no-vae", "--prompt", "a", "--out", "out"), USAGE,
     ("export-no-vae", "VAE", "gone")),
    ("sample-hf-not-cached", (*CLI, "sample", "hf://org/absent", "--prompt", "a", "--out", "out"), USAGE,
     ("hf://org/absent", "HF_HUB_OFFLINE")),
    ("push-not-export", (*CLI, "push", "empty", "org/name"), USAGE, ("empty",)),
    ("push-bad-repo-id", (*CLI, "push", "export", "noslash"), USAGE, ("noslash",)),
    ("cost-misspelt-section", (*CLI, "cost", "estimate", str(RECIPES / "smoke_1gpu.yaml"), "optimiser.lr=1"), USAGE,
     ("optimiser",)),
    ("cost-duration-abc", (*CLI, "cost", "estimate", str(RECIPES / "smoke_1gpu.yaml"), "train.max_duration=abc"),
     USAGE, ("max_duration", "abc")),
    ("cost-unknown-preset", (*CLI, "cost", "estimate", str(RECIPES / "smoke_1gpu.yaml"), "model.preset=Nope"), USAGE,
     ("Nope",)),
    ("cost-mfu-2", (*CLI, "cost", "estimate", str(RECIPES / "smoke_1gpu.yaml"), "--mfu", "2"), USAGE,
     ("--mfu", "2")),
    ("cost-devices-0", (*CLI, "cost", "estimate", str(RECIPES / "smoke_1gpu.yaml"), "--devices", "0"), USAGE,
     ("--devices", "0")),
    ("cost-missing-recipe", (*CLI, "cost", "estimate", "nope.yaml"), USAGE, ("nope.yaml",)),
    ("cost-report-missing", (*CLI, "cost", "report", "nope"), USAGE, ("nope",)),
    ("cost-report-no-ledger", (*CLI, "cost", "report", "empty"), USAGE, ("empty",)),
    ("export-missing", (*CLI, "export", "nope", "--out", "out"), USAGE, ("nope",)),
    ("export-empty", (*CLI, "export", "empty", "--out", "out"), USAGE, ("empty",)),
    ("import-reference-missing", (*CLI, "import-reference", "nope.pt", "--out", "out"), USAGE, ("nope.pt",)),
    ("eval-fid-missing-gen", (*CLI, "eval", "fid", "nope", "--ref", "images"), USAGE, ("nope",)),
    ("eval-fid-missing-ref", (*CLI, "eval", "fid", "images", "--ref", "nope"), USAGE, ("nope",)),
    ("eval-compose-missing", (*CLI, "eval", "compose", "nope"), USAGE, ("nope",)),
    ("eval-sweep-preset", (*CLI, "eval", "sweep", "export", "--out", "out", "--presets", "heun:abc"), USAGE,
     ("heun:abc",)),
    ("eval-sweep-sampler", (*CLI, "eval", "sweep", "export", "--out", "out", "--presets", "eulerr:10"), USAGE,
     ("eulerr",)),
    ("eval-coco-num-0", (*CLI, "eval", "coco", "export", "--out", "out", "--num", "0"), USAGE, ("--num", "0")),
    ("data-compose-exists", (*CLI, "data", "compose", "--out", "taken", "--count", "2", "--seed", "0"), USAGE,
     ("taken",)),
    ("data-compose-count", (*CLI, "data", "compose", "--out", "new", "--count", "-4", "--seed", "0"), USAGE,
     ("--count", "-4")),
    ("data-verify-missing", (*CLI, "data", "verify", "nope"), USAGE, ("nope",)),
    ("data-mix-missing", (*CLI, "data", "mix", "nope.yaml"), USAGE, ("nope.yaml",)),
    ("experiment-missing", (*CLI, "experiment", "nope.yaml"), USAGE, ("nope.yaml",)),
    ("demo-out-file", (*CLI, "demo", "--out", "afile.txt"), USAGE, ("afile.txt",)),
    ("train-missing-recipe", (*CLI, "train", "nope.yaml"), USAGE, ("nope.yaml",)),
    ("distill-not-distill", (*CLI, "distill", str(RECIPES / "demo_masked.yaml")), USAGE, ("demo_masked",)),
    ("precompute-missing", ("-m", "data_prep.precompute", "nope", "--out", "out", "--resolution", "64"), USAGE,
     ("nope",)),
    ("convert-missing", ("-m", "data_prep.convert", "nope", "--format", "folder", "--out", "out"), USAGE, ("nope",)),
    ("download-fraction", ("-m", "data_prep.download", "coco2014", "--out", "out", "--fraction", "2", "--dry-run"),
     USAGE, ("--fraction", "2")),
    ("download-unknown", ("-m", "data_prep.download", "imagenet", "--out", "out", "--dry-run"), USAGE, ("imagenet",)),
]


def _tiny_export(out: Path) -> None:
    """A diffusion-model export without EMA: a tiny network, the demo VAE and the packaged MiniLM."""
    from micro_diffusion.demo import demo_vae_path
    from micro_diffusion.exported import export_model
    from micro_diffusion.models import create_dit

    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=384, width=64, depth=2, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=64)
    config = {"preset": "MicroDiT_Tiny_2", "network": net.cfg.to_dict(), "recipe": "test", "sigma_data": 0.5,
              "encoders": {"vae": str(demo_vae_path()), "scaling_factor": 1.0, "latent_channels": 4, "downsample": 8,
                           "text_encoder": "minilm", "caption_len": 8, "caption_dim": 384, "resolutions": [64]}}
    export_model(net.state_dict(), None, config, np.zeros((8, 384), np.float16), out)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """The folder every case runs in."""
    root = tmp_path_factory.mktemp("bad_input")
    _tiny_export(root / "export")
    shutil.copytree(root / "export", root / "export-no-vae")
    config = json.loads((root / "export-no-vae" / "config.json").read_text())
    config["encoders"]["vae"] = str(root / "gone")
    (root / "export-no-vae" / "config.json").write_text(json.dumps(config))
    (root / "empty").mkdir()
    (root / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / "images" / f"{i:05d}.png")
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("x")
    (root / "afile.txt").write_text("x")
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _run(root: Path, argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(root.parent / "hub-cache"),
           "TRANSFORMERS_OFFLINE": "1", "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", "/tmp/md-mplconfig")}
    return subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bad_input_table(fixtures):
    """Each case: its documented exit code, one stderr line naming the bad value, no traceback, no new files."""
    before = _snapshot(fixtures)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: _run(fixtures, case[1]), CASES))
    failures = []
    for (name, _, code, needles), proc in zip(CASES, results, strict=True):
        lines = proc.stderr.splitlines()
        problems = [f"exit {proc.returncode}, expected {code}"] if proc.returncode != code else []
        if len(lines) != 1 or not lines[0].strip():
            problems.append(f"{len(lines)} stderr lines")
        problems += [f"no {n!r}" for n in needles if n not in proc.stderr]
        if "Traceback" in proc.stderr:
            problems.append("a traceback")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {proc.stderr.strip()[-600:]!r}")
    after = _snapshot(fixtures)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not failures and not changed, "\n".join([*failures, f"paths new or changed: {changed}"])
