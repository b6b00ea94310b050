"""The exported-model folder: safetensors weights, config.json and the null caption, written and read without pickles.

A folder holds `model.safetensors` (raw weights), `ema.safetensors` (when EMA ran), `config.json` (model family,
preset name, resolved network config, sigma_data, encoders.json content, provenance), `null_caption.npy`
(docs/interfaces.md) and, written by `micro-diffusion export`, the model card `README.md` (eval/card.py).
Training writes it (micro_diffusion.training.export); sampling, evaluation and the demo read it. It imports nothing
from training, so every layer above the network can load a model.

Writing is atomic (micro_diffusion.utils.atomic): the files go into a temporary folder beside the target, which then
replaces the target whole (renameat2 RENAME_EXCHANGE on Linux; elsewhere two renames, between which a kill leaves the
old export at `<name>.old-<pid>`, named by the loader). config.json records each file's size and xxh64 ("files"), and
loading refuses a folder whose files do not belong together (ExportMismatchError, exit 4); exports without "files"
(older ones, or copied by hand) load unchecked.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data.integrity import file_hash
from .errors import DataError, UsageError
from .families import check_preset, family_of
from .utils.atomic import atomic_folder, parked
from .utils.run_folder import EMA_WEIGHTS as EMA_FILE
from .utils.run_folder import EXPORT_CONFIG as CONFIG_FILE
from .utils.run_folder import MODEL_CARD as CARD_FILE
from .utils.run_folder import MODEL_WEIGHTS as MODEL_FILE
from .utils.run_folder import NULL_CAPTION as NULL_FILE

REQUIRED_KEYS = ("preset", "network", "sigma_data", "encoders")
# The network's math, versioned: weights of another format compute something else in this code. 1: exports before
# the released MicroDiT's math (no "network_format" key); 2: q/k LayerNorms, column-first positions, features of
# c_noise itself with GELU, zero mask token in output space (docs/interfaces.md, "Exported models").
NETWORK_FORMAT = 2
FILES = "files"  # config.json: {file name: {"bytes": n, "xxh64": hex}} of the weights and the null caption
HASH = "xxh64"


class ExportMismatchError(DataError):
    """An export's file does not match the size or xxh64 its config.json records: files of two exports (exit 4)."""


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: safetensors stores plain, unshared tensors only."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def check_target(out_dir: str | Path) -> Path:
    """out_dir as a Path, refused when it holds something an export must not replace (files but no export)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder: choose another output folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UsageError(f"{out} is a folder that holds no exported model: an export replaces its folder whole; "
                         "choose a new or empty folder, or an earlier export's")
    return out


def export_model(net_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None, config: dict,
                 null_caption: np.ndarray, out_dir: str | Path, card: Callable[[dict], str] | None = None) -> Path:
    """Write the exported-model folder atomically, replacing an export there whole; config needs the REQUIRED_KEYS.

    card: the model card's text (README.md) from the config.json record, written in the same atomic step; it is not
    among the hashed files (loading never reads it, and an edited card must not make the weights unloadable).
    """
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise KeyError(f"export config lacks key(s) {missing}; it needs {list(REQUIRED_KEYS)}")
    null = np.asarray(null_caption)
    if null.ndim != 2 or null.shape[1] != config["network"]["caption_dim"]:
        raise ValueError(f"null caption shape {null.shape} does not fit caption_dim {config['network']['caption_dim']}")
    if ema_state is not None and set(ema_state) != set(net_state):
        raise KeyError(f"EMA and raw weights name different tensors: {sorted(set(ema_state) ^ set(net_state))[:5]}")
    out = check_target(out_dir)
    meta = {"format": "pt", "preset": str(config["preset"])}
    with atomic_folder(out) as tmp:  # the old export stays whole until the new one replaces it
        save_file(_tensors(net_state), str(tmp / MODEL_FILE), metadata=meta)
        if ema_state is not None:
            save_file(_tensors(ema_state), str(tmp / EMA_FILE), metadata=meta)
        np.save(tmp / NULL_FILE, null)
        files = {f.name: {"bytes": f.stat().st_size, HASH: file_hash(f, HASH)}
                 for f in (tmp / MODEL_FILE, tmp / EMA_FILE, tmp / NULL_FILE) if f.is_file()}
        record = {**config, "network_format": NETWORK_FORMAT, "has_ema": ema_state is not None, FILES: files}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
        if card is not None:
            (tmp / CARD_FILE).write_text(card(record), encoding="utf-8")
    return out


def is_export(path: str | Path) -> bool:
    """True for a folder with an exported model's config.json and weights."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def read_config(model_dir: str | Path) -> dict:
    """An export's config.json, refused (naming both versions) when its network format is not this code's."""
    cfg_file = Path(model_dir) / CONFIG_FILE
    if not cfg_file.is_file():
        hint = ""
        old = [] if Path(model_dir).exists() else parked(Path(model_dir).absolute())
        if old:  # the fallback's two renames were cut between them
            hint = f"; an interrupted export left the previous one whole at {old[-1]}: rename it to {model_dir}"
        raise FileNotFoundError(f"{cfg_file} does not exist: not an exported model folder (micro-diffusion export)"
                                + hint)
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
    check_files(model_dir, config, hashed=(weights.name, NULL_FILE))
    return load_file(str(weights)), {**config, "weights_file": weights.name}


def check_files(model_dir: str | Path, config: dict, hashed: tuple[str, ...] = ()) -> None:
    """Each file config.json records has its size, and those in `hashed` (the ones read) their xxh64 and presence.

    A recorded file that is absent and not read (an EMA file left out of a copy) is no mismatch; any other difference
    is an ExportMismatchError naming the file.
    """
    model_dir = Path(model_dir)
    for name, want in config.get(FILES, {}).items():
        path = model_dir / name
        if not path.is_file():
            if name in hashed:
                raise ExportMismatchError(f"{path} is missing, but {model_dir / CONFIG_FILE} records it "
                                          f"({want['bytes']} bytes): export the model again")
            continue
        size, found = path.stat().st_size, None
        if size != want["bytes"]:
            found = f"{size} bytes"
        elif name in hashed and (digest := file_hash(path, HASH)) != want[HASH]:
            found = f"xxh64 {digest}"
        if found is not None:
            raise ExportMismatchError(
                f"{path} does not belong to this export: {model_dir / CONFIG_FILE} records {want['bytes']} bytes, "
                f"xxh64 {want[HASH]}, the file has {found} (a file of another export, or damaged): export the model "
                "again, or copy the whole folder")


def load_exported(model_dir: str | Path, use_ema: bool | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict, np.ndarray]:
    """(network of the export's family in eval mode, config, null caption) from an exported folder; use_ema=None
    takes EMA when present."""
    state, config = load_weights(model_dir, use_ema)
    fam = family_of(config)
    try:
        check_preset(config["preset"], fam.name, f"{Path(model_dir) / CONFIG_FILE}")
    except UsageError as err:
        raise DataError(str(err)) from err
    net = fam.create(config["preset"], **config["network"])
    net.load_state_dict(state)  # strict: a mismatch names the missing/unexpected keys
    return net.to(device).eval(), config, np.load(Path(model_dir) / NULL_FILE)
