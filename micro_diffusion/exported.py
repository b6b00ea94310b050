"""The exported-model folder: safetensors weights, config.json and the null caption, written and read without pickles.

A folder holds `model.safetensors` (raw weights), `ema.safetensors` (when EMA ran), `config.json` (preset name,
resolved network config, sigma_data, encoders.json content, provenance) and `null_caption.npy` (docs/interfaces.md).
Training writes it (micro_diffusion.training.export); sampling, evaluation and the demo read it. It imports nothing
from training, so every layer above the network can load a model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .models import MicroDiT, create_dit
from .utils.run_folder import EMA_WEIGHTS as EMA_FILE
from .utils.run_folder import EXPORT_CONFIG as CONFIG_FILE
from .utils.run_folder import MODEL_WEIGHTS as MODEL_FILE
from .utils.run_folder import NULL_CAPTION as NULL_FILE

REQUIRED_KEYS = ("preset", "network", "sigma_data", "encoders")
# The network's math, versioned: weights of another format compute something else in this code. 1: exports before
# the released MicroDiT's math (no "network_format" key); 2: q/k LayerNorms, column-first positions, features of
# c_noise itself with GELU, zero mask token in output space (docs/interfaces.md, "Exported models").
NETWORK_FORMAT = 2


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: safetensors stores plain, unshared tensors only."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def export_model(net_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None, config: dict,
                 null_caption: np.ndarray, out_dir: str | Path) -> Path:
    """Write the exported-model folder; config needs the REQUIRED_KEYS."""
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
    record = {**config, "network_format": NETWORK_FORMAT, "has_ema": ema_state is not None}
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    np.save(out / NULL_FILE, null)
    return out


def is_export(path: str | Path) -> bool:
    """True for a folder with an exported model's config.json and weights."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def read_config(model_dir: str | Path) -> dict:
    """An export's config.json, refused (naming both versions) when its network format is not this code's."""
    cfg_file = Path(model_dir) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist: not an exported model folder (micro-diffusion export)")
    config = json.loads(cfg_file.read_text())
    found = config.get("network_format", 1)
    if found != NETWORK_FORMAT:
        raise ValueError(f"{model_dir} holds network format {found}, this micro_diffusion reads format "
                         f"{NETWORK_FORMAT}: its weights were trained for another network's math (no exact "
                         "conversion exists); retrain, or sample it with the micro_diffusion version that wrote it")
    return config


def load_weights(model_dir: str | Path, use_ema: bool | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config with "weights_file") of an export; use_ema=None takes EMA when present."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights = model_dir / (EMA_FILE if (use_ema is None and (model_dir / EMA_FILE).exists()) or use_ema
                           else MODEL_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist" + (" (this export has no EMA)" if use_ema else ""))
    return load_file(str(weights)), {**config, "weights_file": weights.name}


def load_exported(model_dir: str | Path, use_ema: bool | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[MicroDiT, dict, np.ndarray]:
    """(network in eval mode, config, null caption) from an exported folder; use_ema=None takes EMA when present."""
    state, config = load_weights(model_dir, use_ema)
    net = create_dit(config["preset"], **config["network"])
    net.load_state_dict(state)  # strict: a mismatch names the missing/unexpected keys
    return net.to(device).eval(), config, np.load(Path(model_dir) / NULL_FILE)
