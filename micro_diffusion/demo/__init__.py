"""The CPU demo: its pipeline and a small trained VAE (its scenes are data.shapes, its reader eval.reader)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = Path("runs/demo")  # where `make demo` and `micro-diffusion demo` write unless told otherwise
# The demo's steps in the order run_demo takes them; each leaves a done marker (step_marker) and is then reused.
STEPS = ("data", "train_masked", "train_finetune", "export", "sample", "evaluate", "train_distill", "export_student",
         "distilled", "train_fluid", "export_fluid", "fluid")


def step_marker(root: Path, name: str) -> Path:
    """The file a finished demo step leaves: its result and duration, reused by the next run."""
    return Path(root) / "steps" / f"{name}.json"


def demo_vae_path() -> Path:
    """Folder of the small demo AutoencoderKL (diffusers `save_pretrained` layout), shipped as package data."""
    return Path(__file__).resolve().parent / "assets" / "vae"
