"""The MDS column schema of latent shards, and reading shapes and dtypes back from a shard index.

Latent shape and dtype always come from the index's column encodings (`ndarray:float16:4,32,32`), so a loader or a
model never hard-codes what precompute wrote.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CAPTION_EMB = "caption_emb"
CAPTION = "caption"
SAMPLE_ID = "id"
NULL_CAPTION_FILE = "null_caption.npy"
ENCODERS_FILE = "encoders.json"


def latent_column(resolution: int) -> str:
    """Column name of the latents at one image resolution (`latents_256`)."""
    return f"latents_{int(resolution)}"


@dataclass(frozen=True)
class ArraySpec:
    """A fixed-shape ndarray column: its dtype and shape as the index encodes them."""

    dtype: np.dtype
    shape: tuple[int, ...]

    def encoding(self) -> str:
        """The MDS encoding string of this spec (`ndarray:float16:4,32,32`)."""
        return f"ndarray:{self.dtype.name}:{','.join(str(s) for s in self.shape)}"


def parse_ndarray_encoding(encoding: str, where: str) -> ArraySpec:
    """Parse a fixed-shape `ndarray:DTYPE:D1,D2,...` encoding; `where` names the column and file in errors."""
    parts = encoding.split(":")
    if len(parts) != 3 or parts[0] != "ndarray" or not parts[2]:
        raise ValueError(f"{where}: expected a fixed-shape encoding 'ndarray:DTYPE:D1,D2,...', got {encoding!r}")
    try:
        dtype = np.dtype(parts[1])
        shape = tuple(int(s) for s in parts[2].split(","))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: cannot parse encoding {encoding!r}: {err}") from err
    return ArraySpec(dtype=dtype, shape=shape)


def column_encodings(shard_info: dict, where: str) -> dict[str, str]:
    """Map column name -> encoding for one shard entry of an index.json."""
    names, encodings = shard_info.get("column_names"), shard_info.get("column_encodings")
    if names is None or encodings is None:
        raise ValueError(f"{where}: shard entry has no column_names/column_encodings (not an MDS shard?)")
    return dict(zip(names, encodings, strict=True))


def index_shards(local: str | os.PathLike) -> tuple[Path, list[dict]]:
    """(path of index.json, its shard entries) of the MDS dataset at `local`."""
    path = Path(local) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no MDS index at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            shards = json.load(f).get("shards", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not an MDS index ({type(err).__name__}: {err})") from err
    return path, shards


def read_index_samples(local: str | os.PathLike) -> int:
    """Number of samples in the MDS dataset at `local`: the sum of its shards' `samples` (0 for an empty index)."""
    path, shards = index_shards(local)
    try:
        return sum(int(info["samples"]) for info in shards)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: a shard entry has no sample count ({type(err).__name__}: {err})") from err


def read_index_columns(local: str | os.PathLike) -> dict[str, str]:
    """Column name -> encoding of the MDS dataset at `local`, checked to be the same in every shard."""
    path, shards = index_shards(local)
    if not shards:
        raise ValueError(f"{path}: the index lists no shards")
    first = column_encodings(shards[0], str(path))
    for info in shards[1:]:
        cols = column_encodings(info, str(path))
        if cols != first:
            raise ValueError(f"{path}: shard {info.get('raw_data', {}).get('basename')} has columns {cols}, "
                             f"the first shard has {first}")
    return first


def latent_spec(columns: dict[str, str], resolution: int, where: str) -> ArraySpec:
    """The latents spec at `resolution`; an error naming the resolution and `where` if the column is missing."""
    name = latent_column(resolution)
    if name not in columns:
        have = sorted(c for c in columns if c.startswith("latents_"))
        raise KeyError(f"{where}: no column {name!r} for resolution {resolution} (latent columns present: {have})")
    return parse_ndarray_encoding(columns[name], f"{where} column {name}")


def caption_spec(columns: dict[str, str], where: str) -> ArraySpec:
    """The caption-embedding spec; an error naming `where` if the column is missing."""
    if CAPTION_EMB not in columns:
        raise KeyError(f"{where}: no column {CAPTION_EMB!r} (columns present: {sorted(columns)})")
    return parse_ndarray_encoding(columns[CAPTION_EMB], f"{where} column {CAPTION_EMB}")
