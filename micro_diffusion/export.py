"""Export a trained network as safetensors + JSON, and load it back without unpickling anything.

An exported folder holds `model.safetensors` (raw weights), `ema.safetensors` (when EMA ran), `config.json` (preset
name, resolved network config, encoders.json content, recipe name) and `null_caption.npy` (docs/interfaces.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from . import __version__

MODEL_FILE, EMA_FILE, CONFIG_FILE, NULL_FILE = "model.safetensors", "ema.safetensors", "config.json", "null_caption.npy"
REQUIRED_KEYS = ("preset", "network", "encoders")


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: safetensors stores plain, unshared tensors only."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def export_model(net_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None, config: dict,
                 null_caption: np.ndarray, out_dir: str | Path) -> Path:
    """Write the exported-model folder; config needs 'preset', 'network' (DiTConfig dict) and 'encoders'."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise KeyError(f"export config lacks key(s) {missing}; it needs {list(REQUIRED_KEYS)}")
    null = np.asarray(null_caption)
    if null.ndim != 2 or null.shape[1] != config["network"]["caption_dim"]:
        raise ValueError(f"null caption shape {null.shape} does not fit caption_dim {config['network']['caption_dim']}")
    if ema_state is not None and set(ema_state) != set(net_state):
        raise KeyError(f"EMA and raw weights name different tensors: {sorted(set(ema_state) ^ set(net_state))[:5]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "preset": str(config["preset"])}
    save_file(_tensors(net_state), str(out / MODEL_FILE), metadata=meta)
    if ema_state is not None:
        save_file(_tensors(ema_state), str(out / EMA_FILE), metadata=meta)
    elif (out / EMA_FILE).exists():  # a stale EMA file from an earlier export would be loaded as this model's
        (out / EMA_FILE).unlink()
    (out / CONFIG_FILE).write_text(json.dumps({**config, "has_ema": ema_state is not None}, indent=2))
    np.save(out / NULL_FILE, null)
    return out


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


def _find_run(run_or_checkpoint: Path, config_path: Path | None) -> tuple[Path, Path]:
    """(checkpoint file, config.yaml) for a run folder or a checkpoint inside runs/<name>/checkpoints/."""
    from .training.run import LATEST

    if run_or_checkpoint.is_dir():
        ckpt = run_or_checkpoint / "checkpoints" / LATEST
        config = config_path or run_or_checkpoint / "config.yaml"
    else:
        ckpt = run_or_checkpoint
        config = config_path or run_or_checkpoint.resolve().parent.parent / "config.yaml"
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    if not config.is_file():
        raise FileNotFoundError(f"run config {config} does not exist (pass --config for a checkpoint outside its run)")
    return ckpt, config


def export_run(run_or_checkpoint: str | Path, out_dir: str | Path, config_path: str | Path | None = None) -> Path:
    """Export a training run's (or one checkpoint's) network with its resolved config, encoders and null caption."""
    from .data.schema import ENCODERS_FILE, NULL_CAPTION_FILE
    from .recipe import resolve_streams
    from .training.builder import build_network

    ckpt, config = _find_run(Path(run_or_checkpoint), Path(config_path) if config_path else None)
    info = yaml.safe_load(config.read_text())
    if not isinstance(info, dict) or "recipe" not in info:
        raise KeyError(f"{config} has no 'recipe' section (expected the config.yaml micro-diffusion train writes)")
    cfg = info["recipe"]
    with torch.device("meta"):
        net = build_network(cfg)
    raw, ema = load_composer_checkpoint(ckpt)
    expected = set(net.state_dict())
    if set(raw) != expected:
        raise KeyError(f"{ckpt}: network tensors differ from the recipe's {cfg['model']['preset']}: "
                       f"{sorted(set(raw) ^ expected)[:5]}")
    shards = Path(resolve_streams(cfg)[0]["local"])
    for f in (shards / ENCODERS_FILE, shards / NULL_CAPTION_FILE):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: export records the encoders and null caption of the data")
    export_cfg = {"preset": cfg["model"]["preset"], "network": net.cfg.to_dict(),
                  "encoders": json.loads((shards / ENCODERS_FILE).read_text()), "recipe": cfg.get("stage"),
                  "sigma_data": cfg["diffusion"]["sigma_data"], "source_checkpoint": str(ckpt),
                  "git_revision": info.get("git_revision"), "micro_diffusion_version": __version__}
    return export_model(raw, ema, export_cfg, np.load(shards / NULL_CAPTION_FILE), out_dir)


def load_exported(model_dir: str | Path, use_ema: bool | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[torch.nn.Module, dict, np.ndarray]:
    """(network in eval mode, config, null caption) from an exported folder; use_ema=None takes EMA when present."""
    from .models import create_dit

    model_dir = Path(model_dir)
    cfg_file = model_dir / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist: not an exported model folder (micro-diffusion export)")
    config = json.loads(cfg_file.read_text())
    weights = model_dir / (EMA_FILE if (use_ema is None and (model_dir / EMA_FILE).exists()) or use_ema
                           else MODEL_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist" + (" (this export has no EMA)" if use_ema else ""))
    net = create_dit(config["preset"], **config["network"])
    net.load_state_dict(load_file(str(weights)))  # strict: a mismatch names the missing/unexpected keys
    return net.to(device).eval(), {**config, "weights_file": weights.name}, np.load(model_dir / NULL_FILE)
