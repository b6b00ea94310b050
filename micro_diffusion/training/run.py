"""From a validated recipe to a run plan: folders, the previous stage's checkpoint, devices, batch split, run info."""
from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from micro_diffusion.data.inputs import missing_inputs
from micro_diffusion.data.schema import NULL_CAPTION_FILE
from micro_diffusion.recipe import RecipeError, is_remote, latent_size
from micro_diffusion.utils.devices import composer_device, torch_device
from micro_diffusion.utils.run_folder import checkpoint_dir, config_file, latest_checkpoint
from micro_diffusion.version import __version__


@dataclass
class RunPlan:
    """Everything the recipe leaves to the machine it runs on, resolved once."""

    run_dir: str
    save_folder: str
    init_checkpoint: str | None
    world_size: int
    device: str  # "cpu" or "gpu"
    precision: str
    parallelism: str  # "fsdp", "ddp" or "none"
    device_batch: int  # global batch / world size
    device_microbatch: int
    latent_size: int


def _device(requested: str) -> str:
    try:
        return composer_device(torch_device(requested))
    except RuntimeError as err:
        raise RecipeError(f"train.device: {err}") from err


def _precision(requested: str, device: str) -> str:
    if requested == "auto":
        # bf16 autocast is the paper's; Composer trains on CPU in fp32 only (it rejects amp_* there).
        return "amp_bf16" if device == "gpu" else "fp32"
    if device == "cpu" and requested != "fp32":
        raise RecipeError(f"train.precision {requested!r}: Composer supports only fp32 on CPU (use auto or fp32)")
    return requested


def parallelism(requested: str, device: str, world: int) -> str:
    """train.parallelism resolved for a device kind and world size: auto picks none, FSDP (GPUs) or DDP (CPUs)."""
    if requested == "auto":
        if world == 1:
            return "none"
        return "fsdp" if device == "gpu" else "ddp"
    if requested == "fsdp" and device != "gpu":
        raise RecipeError("train.parallelism fsdp needs GPUs (Composer's FSDP runs on CUDA only); use ddp on CPU")
    if requested == "none" and world > 1:
        raise RecipeError(f"train.parallelism none with {world} processes: use ddp, fsdp or auto")
    return requested


def plan_run(cfg: dict, run_dir: str | os.PathLike | None = None, world_size: int | None = None) -> RunPlan:
    """Resolve folders, device, precision, parallelism and the per-device batch; errors name the key at fault."""
    world = int(world_size or os.environ.get("WORLD_SIZE", 1))
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg["runs_root"]) / cfg["stage"]
    save_folder = cfg["checkpoint"]["save_folder"] or str(checkpoint_dir(run_dir))
    init = cfg["init_checkpoint"]
    if init is None and cfg["init_from"] is not None:
        init = str(latest_checkpoint(Path(cfg["runs_root"]) / cfg["init_from"]))
    t = cfg["train"]
    if t["global_batch"] % world:
        raise RecipeError(f"train.global_batch {t['global_batch']} does not split over {world} devices")
    device_batch = t["global_batch"] // world
    if device_batch % t["device_microbatch"]:
        raise RecipeError(f"train.device_microbatch {t['device_microbatch']} does not divide the per-device batch "
                          f"{device_batch} (global {t['global_batch']} / {world} devices)")
    device = _device(t["device"])
    if "low_precision_layernorm" in cfg["algorithms"] and device != "gpu":
        raise RecipeError("algorithms.low_precision_layernorm runs on GPUs only (Composer's LPLayerNorm needs "
                          "CUDA autocast); remove it for a CPU run")
    return RunPlan(run_dir=str(run_dir), save_folder=save_folder, init_checkpoint=init, world_size=world,
                   device=device, precision=_precision(t["precision"], device),
                   parallelism=parallelism(t["parallelism"], device, world), device_batch=device_batch,
                   device_microbatch=t["device_microbatch"], latent_size=latent_size(cfg))


def null_caption(cfg: dict, shard_dir: str | os.PathLike | None) -> np.ndarray | None:
    """The stage's null caption (L, D) per data.null_caption: zeros, or null_caption.npy in shard_dir (None without a
    folder: the loader then reads the first stream's own, remote ones included)."""
    if cfg["data"]["null_caption"] == "zeros":
        return np.zeros((cfg["model"]["caption_len"], cfg["model"]["caption_dim"]), dtype=np.float16)
    return None if shard_dir is None else np.load(Path(shard_dir) / NULL_CAPTION_FILE)


def check_inputs(cfg: dict, plan: RunPlan) -> None:
    """Fail at once, naming the path, when a data folder or the previous stage's checkpoint is missing."""
    problems = missing_inputs(cfg, plan.init_checkpoint)
    if problems:
        raise RecipeError("cannot start stage " + repr(cfg["stage"]) + ":\n  " + "\n  ".join(problems))


def git_revision() -> str:
    """The package checkout's commit, with '+dirty' for uncommitted changes; 'unknown' outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unknown ({type(err).__name__}: not a git checkout or git missing)"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_info(cfg: dict, plan: RunPlan) -> dict:
    """The record saved as the run folder's config.yaml: resolved recipe, run plan, package version, git revision."""
    return {"micro_diffusion_version": __version__, "git_revision": git_revision(), "plan": asdict(plan),
            "recipe": cfg}


def write_run_info(info: dict, run_dir: str) -> Path:
    """Write config.yaml into the run folder (local folders only)."""
    if is_remote(run_dir):
        raise RecipeError(f"run folder {run_dir} must be local (checkpoints may go to a remote save_folder)")
    path = config_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(info, f, sort_keys=False)
    return path
