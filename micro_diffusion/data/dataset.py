"""A StreamingDataset over latent shards: one resolution's latents, caption embeddings, and caption dropout."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataset

from micro_diffusion.data.schema import (
    CAPTION,
    CAPTION_EMB,
    NULL_CAPTION_FILE,
    SAMPLE_ID,
    ArraySpec,
    caption_spec,
    latent_column,
    latent_spec,
)


def dropout_draw(seed: int, epoch: int, sample_id: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, sample id), so a resumed run drops the same captions."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def load_null_caption(stream: Stream) -> np.ndarray:
    """Read `null_caption.npy` beside a stream's shards, fetching it from the stream's remote when not cached."""
    path = os.path.join(stream.local, stream.split, NULL_CAPTION_FILE)
    if not os.path.isfile(path):
        if stream.remote is None:
            raise FileNotFoundError(f"no {NULL_CAPTION_FILE} at {path}; pass null_caption= or run precompute there")
        # Stream's own downloader handles s3://, gs:// and the rest with its retries and timeouts.
        path = stream._download_file(NULL_CAPTION_FILE)
    return np.load(path)


class LatentDataset(StreamingDataset):
    """Yields {"latents": (C,h,w), "caption_emb": (L,D) arrays in the shards' dtype, "caption": str, "id": str}.

    Caption dropout replaces the embedding with the null caption's (and the caption with "") for a fraction
    `caption_drop_prob` of samples, decided by a hash of (seed, epoch, sample id): the same samples are dropped
    whatever the number of ranks or workers, and after a mid-epoch resumption.
    """

    def __init__(
        self,
        streams: list[Stream],
        resolution: int,
        caption_drop_prob: float = 0.1,
        null_caption: np.ndarray | None = None,
        seed: int = 17,
        **streaming_kwargs: Any,
    ) -> None:
        if not 0.0 <= caption_drop_prob <= 1.0:
            raise ValueError(f"caption_drop_prob must be in [0, 1], got {caption_drop_prob}")
        super().__init__(streams=streams, shuffle_seed=seed, **streaming_kwargs)
        self.resolution = int(resolution)
        self.latent_key = latent_column(resolution)
        self.caption_drop_prob = float(caption_drop_prob)
        self.drop_seed = int(seed)
        self.latent_spec, self.caption_spec = self._check_columns()
        if null_caption is None:
            null_caption = load_null_caption(self.streams[0])
        null_caption = np.asarray(null_caption)
        if null_caption.shape != self.caption_spec.shape:
            raise ValueError(f"null caption has shape {null_caption.shape}, the shards' {CAPTION_EMB} column has "
                             f"{self.caption_spec.shape}")
        # Stored as the shards store embeddings, so a dropped sample stacks like any other.
        self.null_caption = null_caption.astype(self.caption_spec.dtype)  # (L, D)
        self._epoch = 0

    def _check_columns(self) -> tuple[ArraySpec, ArraySpec]:
        """Read latent and caption specs from every shard's encodings; they must agree across all streams."""
        found: tuple[ArraySpec, ArraySpec] | None = None
        for shard, stream_id in zip(self.shards, self.stream_per_shard, strict=True):
            stream = self.streams[stream_id]
            where = f"{stream.remote or stream.local} (shard {shard.raw_data.basename})"
            columns = dict(zip(shard.column_names, shard.column_encodings, strict=True))
            specs = (latent_spec(columns, self.resolution, where), caption_spec(columns, where))
            if found is None:
                found = specs
            elif specs != found:
                raise ValueError(f"{where}: latents/caption specs {specs} differ from the first shard's {found}")
        if found is None:
            raise ValueError("the streams hold no shards")
        return found

    def _resume_incr_epoch(self) -> tuple[int, int]:
        """Remember the epoch this worker is iterating (Streaming does not expose it to get_item)."""
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """One decoded sample with caption dropout applied; arrays stay float16 views until `collate_latents`."""
        sample = super().get_item(sample_id, retry)
        caption = sample[CAPTION]
        if self.caption_drop_prob > 0 and dropout_draw(self.drop_seed, self._epoch, sample_id) < self.caption_drop_prob:
            caption_emb, caption = self.null_caption, ""  # (L, D)
        else:
            caption_emb = sample[CAPTION_EMB]  # (L, D)
        return {"latents": sample[self.latent_key], "caption_emb": caption_emb, "caption": caption,
                "id": sample[SAMPLE_ID]}


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: latents (B,C,h,w) and caption_emb (B,L,D) float32 tensors, caption and id lists."""
    # Stacking the shard's float16 views, then one conversion, touches the least memory: the decoded arrays are
    # read-only views of the shard bytes, so the stack is the one copy they need (torch.stack of per-sample float32
    # tensors was ~3x slower and collapses when torch's intra-op threads compete with other processes).
    latents = torch.from_numpy(np.stack([s["latents"] for s in samples])).float()  # (B, C, h, w)
    caption_emb = torch.from_numpy(np.stack([s["caption_emb"] for s in samples])).float()  # (B, L, D)
    return {"latents": latents, "caption_emb": caption_emb, "caption": [s["caption"] for s in samples],
            "id": [s["id"] for s in samples]}
