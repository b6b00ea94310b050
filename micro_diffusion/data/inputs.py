"""What a recipe's inputs must hold before a stage starts: its shard folders (against the recipe's shapes) and the
checkpoint it starts from. Checked by the dry run and before any real run builds a model."""
from __future__ import annotations

import json
from pathlib import Path

from micro_diffusion.data.schema import ENCODERS_FILE, caption_spec, latent_column, latent_spec, read_index_columns
from micro_diffusion.recipe import is_remote, resolve_streams


def missing_inputs(cfg: dict, init_checkpoint: str | None) -> list[str]:
    """Local inputs that do not exist or do not fit the recipe: stream folders without a remote (their index.json and
    encoders.json are checked against the recipe), and the previous stage's checkpoint."""
    problems = []
    for key in ("streams", "val_streams"):
        for i, s in enumerate(resolve_streams(cfg, key)):
            if s["remote"] is None and not (Path(s["local"]) / "index.json").is_file():
                problems.append(f"data.{key}[{i}]: no MDS index at {Path(s['local']) / 'index.json'}")
            elif s["remote"] is None:
                problems += [f"data.{key}[{i}]: {p}" for p in shard_mismatches(cfg, Path(s["local"]))]
    if init_checkpoint is not None and not is_remote(init_checkpoint) and not Path(init_checkpoint).exists():
        problems.append(f"stage {cfg['stage']!r} starts from {cfg['init_from'] or 'init_checkpoint'}, but its "
                        f"checkpoint {init_checkpoint} does not exist (run that stage first)")
    if not cfg["data"]["streams"]:
        problems.append("data.streams is empty")
    return problems


def shard_mismatches(cfg: dict, folder: Path) -> list[str]:
    """Where the latent shards in `folder` (index.json, encoders.json) disagree with the recipe, naming both values."""
    m, d = cfg["model"], cfg["data"]
    side = d["resolution"] // d["vae_downsample"]
    want = {"latent_channels": m["latent_channels"], "caption_len": m["caption_len"], "caption_dim": m["caption_dim"],
            "downsample": d["vae_downsample"]}
    keys = {"latent_channels": "model.latent_channels", "caption_len": "model.caption_len",
            "caption_dim": "model.caption_dim", "downsample": "data.vae_downsample"}
    problems = []
    enc_file = folder / ENCODERS_FILE
    if enc_file.is_file():
        enc = json.loads(enc_file.read_text(encoding="utf-8"))
        problems += [f"{enc_file} has {k} {enc[k]}, the recipe's {keys[k]} is {v}"
                     for k, v in want.items() if k in enc and enc[k] != v]
        if "resolutions" in enc and d["resolution"] not in enc["resolutions"]:
            problems.append(f"{enc_file} has resolutions {enc['resolutions']}, the recipe's data.resolution is "
                            f"{d['resolution']}")
    index = folder / "index.json"
    try:
        columns = read_index_columns(folder)
        latents = latent_spec(columns, d["resolution"], str(index)).shape
        caption = caption_spec(columns, str(index)).shape
    except (KeyError, ValueError) as err:
        return problems + [str(err).strip("'\"")]
    expected = (m["latent_channels"], side, side)
    if latents != expected:
        problems.append(f"{index}: {latent_column(d['resolution'])} holds {latents}, the recipe expects {expected} "
                        "(model.latent_channels, data.resolution / data.vae_downsample)")
    if caption != (m["caption_len"], m["caption_dim"]):
        problems.append(f"{index}: caption_emb holds {caption}, the recipe expects "
                        f"{(m['caption_len'], m['caption_dim'])} (model.caption_len, model.caption_dim)")
    return problems
