"""The Python Pipeline: the same images as `micro-diffusion sample`, the export's defaults, students and Fluid, hf://
through the Hub cache, and its bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_exports import encoders, tiny_export, tiny_vae

from micro_diffusion.cli import main
from micro_diffusion.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top left", "a blue square", "a green triangle at the bottom right"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def _pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def _sampled(model: Path, out: Path, *flags: str) -> list[np.ndarray]:
    """The images `micro-diffusion sample` writes for PROMPTS."""
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    assert main(["sample", str(model), *args, "--out", str(out), *flags]) == 0
    return [np.asarray(Image.open(out / f"{k:05d}.png")) for k in range(len(PROMPTS))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "student", "fluid"])
def test_pipeline_images_equal_the_sample_commands(kind, vae, tmp_path):
    """Image k of a call is image k of `micro-diffusion sample` (same seed, the export's settings), whatever the batch
    size; the defaults are the settings the export records (a student: consistency, no guidance)."""
    from micro_diffusion import Pipeline

    model = tiny_export(tmp_path / "model", vae, kind)
    cli = _sampled(model, tmp_path / "cli", "--seed", "3", "--batch-size", "2")
    pipe = Pipeline.from_pretrained(model, device="cpu", batch_size=3)
    out = pipe(PROMPTS, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(out.images), cli, strict=True))
    recorded = json.loads((model / "config.json").read_text())["sampling"]
    assert {k: out.record["sampling"][k] for k in recorded} == recorded
    assert out.images[0].size == (16, 16) and out.latents.shape == (3, 4, 8, 8)
    one = pipe(PROMPTS[1], seed=3, batch_size=1)  # a single caption; image 0 of its own call
    other_seed = pipe(PROMPTS[:1], seed=4)
    assert not np.array_equal(_pixels(other_seed.images)[0], cli[0])
    assert _pixels(one.images)[0].shape == cli[1].shape


@pytest.mark.slow
def test_pipeline_call_settings_override_the_exports_like_the_flags(vae, tmp_path):
    """steps/guidance/sampler given to the call (or to from_pretrained) are the flags of `sample`; the rest stay the
    export's; a dtype and a device are taken."""
    from micro_diffusion import Pipeline

    model = tiny_export(tmp_path / "model", vae)
    cli = _sampled(model, tmp_path / "cli", "--steps", "2", "--guidance", "4", "--sampler", "heun", "--seed", "1")
    pipe = Pipeline.from_pretrained(str(model), device="cpu")  # the compute dtype `sample` uses on this device
    out = pipe(PROMPTS, steps=2, guidance=4.0, sampler="heun", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(out.images), cli, strict=True))
    assert out.record["sampling"]["steps"] == 2
    fixed = Pipeline.from_pretrained(model, steps=2, guidance=4.0, sampler="heun", device="cpu")
    assert np.array_equal(fixed(PROMPTS, seed=1).latents, out.latents)  # from_pretrained's settings: the defaults
    assert fixed(PROMPTS[:1], steps=3, seed=1).record["sampling"]["sampler"] == "heun"
    fp32 = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")(PROMPTS[:1], steps=2, seed=1)
    assert fp32.record["dtype"] == "fp32"
    with pytest.raises(UsageError, match="consistency"):
        pipe(PROMPTS[:1], sampler="consistency", steps=1)
    with pytest.raises(UsageError, match="dtype 'fp8'"):
        Pipeline.from_pretrained(model, dtype="fp8")


def test_bad_pipeline_input_is_a_usage_error_naming_it(vae, tmp_path):
    from micro_diffusion import Pipeline

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty is not an exported model"):
        Pipeline.from_pretrained(tmp_path / "empty")
    model = tiny_export(tmp_path / "model", vae, extra={"encoders": {**encoders(vae), "vae": str(tmp_path / "gone")}})
    with pytest.raises(UsageError, match=r"the VAE '.*gone' that its config.json records cannot be loaded"):
        Pipeline.from_pretrained(model)
    with pytest.raises(UsageError, match="hf://nope is not a Hub model id"):
        Pipeline.from_pretrained("hf://nope")
    with pytest.raises(UsageError, match="hf://org/bad name: Repo id must use"):
        Pipeline.from_pretrained("hf://org/bad name")


def _fill_hub_cache(cache: Path, repo: str, export: Path, rev: str = "0" * 40) -> None:
    """The Hub cache layout huggingface_hub reads: models--org--name/snapshots/<rev>/<files> and refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in export.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)


def _offline(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_hf_ids_load_from_the_hub_cache_offline(vae, tmp_path):
    """hf://org/name resolves through snapshot_download to a pre-filled cache with the Hub offline: the same images
    as the folder itself; an id that is not cached is one line, exit 2, in `sample` and in Python."""
    from micro_diffusion import Pipeline

    model = tiny_export(tmp_path / "model", vae)
    _fill_hub_cache(tmp_path / "hf" / "hub", "org/tiny", model)
    script = ("import sys, numpy as np\nfrom micro_diffusion import Pipeline\n"
              "out = Pipeline.from_pretrained('hf://org/tiny', device='cpu', dtype='fp32')(sys.argv[1:], seed=2)\n"
              "np.save('hub.npy', out.latents.numpy())\nprint(out.record['model'])\n")
    proc = subprocess.run([sys.executable, "-c", script, *PROMPTS], cwd=tmp_path, env=_offline(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("hf://org/tiny")
    local = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")(PROMPTS, seed=2).latents.numpy()
    assert np.array_equal(np.load(tmp_path / "hub.npy"), local)
    proc = subprocess.run([sys.executable, "-m", "micro_diffusion.cli", "sample", "hf://org/absent", "--prompt", "a",
                           "--out", "out"], cwd=tmp_path, env=_offline(tmp_path), capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "hf://org/absent is not in the local Hub cache" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
