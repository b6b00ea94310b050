"""Export a training run: a Composer checkpoint's network (raw and EMA weights) into an exported-model folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from micro_diffusion.cost.ledger import chain_summary
from micro_diffusion.data.schema import ENCODERS_FILE, NULL_CAPTION_FILE
from micro_diffusion.diffusion.sampling import FLUID_FIELDS, sampler_spec
from micro_diffusion.errors import UsageError
from micro_diffusion.eval.card import card_text
from micro_diffusion.exported import check_target, export_model
from micro_diffusion.families import family_of
from micro_diffusion.recipe import build_network, resolve_streams
from micro_diffusion.training.run import null_caption
from micro_diffusion.utils.folder_lock import hold
from micro_diffusion.utils.run_folder import CONFIG, config_file, latest_checkpoint
from micro_diffusion.version import __version__


def _strip(name: str) -> str | None:
    """'module.net.x' / 'net.x' -> 'x' (the network's own key); None for keys outside the network."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name[len("net."):] if name.startswith("net.") else None


def _net_only(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k2: v for k, v in state.items() if (k2 := _strip(k)) is not None}


def load_composer_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(raw, EMA or None) network state dicts from a Composer checkpoint that micro-diffusion train wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Composer checkpoints are pickles, and unpickling runs code: weights_only=False is acceptable ONLY for
    # checkpoints the user's own training wrote. Sampling never reads pickles: it loads the exported safetensors.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    try:
        state = ckpt["state"]
        model = state["model"]
    except (KeyError, TypeError) as err:
        raise KeyError(f"{path} is not a Composer checkpoint (no state.model): {err}") from err
    raw = _net_only(model)
    if not raw:
        raise KeyError(f"{path}: state.model has no 'net.*' tensors; keys start {sorted(model)[:3]}")
    ema = None
    for name, algo in state.get("algorithms", []):
        if name != "EMA" or not algo.get("ema_started") or algo.get("ema_model") is None:
            continue
        store = {**_net_only(algo["ema_model"]["named_parameters_dict"]),
                 **_net_only(algo["ema_model"]["named_buffers_dict"])}
        if algo["ema_weights_active"]:  # saved while the model held the EMA weights: the store holds the raw ones
            raw, ema = {**raw, **store}, raw
        else:
            ema = {**raw, **store}  # parameters that never train are not averaged: they are equal in both
    return raw, ema


def sampling_settings(cfg: dict) -> dict[str, Any]:
    """The recipe's `samples:` sampling settings, as an export's config.json records them for its samplers.

    A distilled student samples with `consistency` and no guidance (its teacher's is baked in): the recipe's steps
    when its samples: section asks for consistency, else one step (sigma_max straight to data).
    """
    s = cfg["samples"]
    out = {"steps": s["steps"], "guidance": s["guidance"], "sampler": s["sampler"],
           "guidance_interval": s.get("guidance_interval")}
    out.update({k: s[k] for k in FLUID_FIELDS if s.get(k) is not None})  # the fluid sampler's, where set
    if cfg.get("distill") and not sampler_spec(s["sampler"]).for_students:
        out.update(steps=1, guidance=1.0, sampler="consistency", guidance_interval=None)
    elif cfg.get("distill"):
        out.update(guidance=1.0, guidance_interval=None)
    return out


def _find_run(run_or_checkpoint: Path, config_path: Path | None) -> tuple[Path, Path]:
    """(checkpoint file, the run's config.yaml) for a run folder or a checkpoint inside runs/<name>/checkpoints/."""
    if not run_or_checkpoint.exists():
        raise UsageError(f"run folder or checkpoint {run_or_checkpoint} does not exist: give runs/<stage> or a "
                         "checkpoint file in it")
    if run_or_checkpoint.is_dir():
        ckpt = latest_checkpoint(run_or_checkpoint)
        config = config_path or config_file(run_or_checkpoint)
    else:
        ckpt = run_or_checkpoint
        config = config_path or config_file(run_or_checkpoint.resolve().parent.parent)
    if not ckpt.exists():
        raise UsageError(f"checkpoint {ckpt} does not exist: {run_or_checkpoint} holds no training checkpoint")
    if not config.is_file():
        raise UsageError(f"run config {config} does not exist (pass --config for a checkpoint outside its run)")
    return ckpt, config


def _run_dir(run_or_checkpoint: Path, ckpt: Path) -> Path:
    """The run folder whose cost ledger paid for a checkpoint: the folder given, or the one holding checkpoints/."""
    return run_or_checkpoint if run_or_checkpoint.is_dir() else ckpt.resolve().parent.parent


def export_run(run_or_checkpoint: str | Path, out_dir: str | Path, config_path: str | Path | None = None) -> Path:
    """Export a training run's (or one checkpoint's) network with its resolved config, encoders and null caption.

    The folder is written atomically (exported.export_model): an export over an older one replaces it whole.
    """
    check_target(out_dir)  # before the checkpoint loads
    ckpt, config = _find_run(Path(run_or_checkpoint), Path(config_path) if config_path else None)
    info = yaml.safe_load(config.read_text())
    if not isinstance(info, dict) or "recipe" not in info:
        raise UsageError(f"{config} has no 'recipe' section (expected the {CONFIG} micro-diffusion train writes)")
    cfg = info["recipe"]
    with torch.device("meta"):
        net = build_network(cfg)
    raw, ema = load_composer_checkpoint(ckpt)
    expected = set(net.state_dict())
    if set(raw) != expected:
        raise UsageError(f"{ckpt}: network tensors differ from the recipe's {cfg['model']['preset']}: "
                       f"{sorted(set(raw) ^ expected)[:5]}")
    shards = Path(resolve_streams(cfg)[0]["local"])
    for f in (shards / ENCODERS_FILE, shards / NULL_CAPTION_FILE):
        if not f.is_file():
            raise UsageError(f"{f} is missing: export records the encoders and null caption of the data")
    export_cfg = {"family": family_of(cfg["model"]).name, "preset": cfg["model"]["preset"],
                  "network": net.cfg.to_dict(),
                  "encoders": json.loads((shards / ENCODERS_FILE).read_text()), "recipe": cfg.get("stage"),
                  "sigma_data": cfg["diffusion"]["sigma_data"], "source_checkpoint": str(ckpt),
                  "git_revision": info.get("git_revision"), "micro_diffusion_version": __version__,
                  "null_caption": cfg["data"]["null_caption"], "sampling": sampling_settings(cfg),
                  "datasets": [Path(s["local"] or s.get("remote") or "").name for s in cfg["data"]["streams"]],
                  "training_cost": chain_summary(_run_dir(Path(run_or_checkpoint), ckpt))}
    if cfg.get("distill"):  # a consistency student: sampled in 1-4 steps, its teacher's guidance baked in
        export_cfg["distilled"] = {"guidance": cfg["distill"]["guidance"], "sigma_max": cfg["distill"]["sigma_max"],
                                   "teacher": cfg.get("init_from") or cfg.get("init_checkpoint")}
    with hold(out_dir, "export", beside=True):  # beside the folder: the export replaces it whole
        return export_model(raw, ema, export_cfg, null_caption(cfg, shards), out_dir,
                            card=lambda record: card_text(record, out_dir))


