"""A StreamingDataset over latent shards: one resolution's latents, caption embeddings, and caption dropout."""
from __future__ import annotations

import hashlib
import os
import struct
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
from micro_diffusion.errors import DataError


def dropout_draw(seed: int, epoch: int, sample_id: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, sample id), so a resumed run drops the same captions."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


# What a damaged sample raises while Streaming decodes it (offsets, lengths or text that are not what was written;
# FloatingPointError: column sizes that overflow, raised instead of numpy's overflow warning).
DECODE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, FloatingPointError, UnicodeDecodeError,
                 struct.error)


# IEEE floats by width: (the unsigned view, the bits below the sign, the all-ones exponent of inf and NaN).
_FLOAT_BITS = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000),
               8: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def all_finite(value: np.ndarray) -> bool:
    """True when no element is NaN or infinite; on the bits, ~15x faster than np.isfinite for float16."""
    if value.dtype.kind != "f" or value.dtype.itemsize not in _FLOAT_BITS or value.size == 0:
        return bool(np.isfinite(value).all())
    view, magnitude, exponent = _FLOAT_BITS[value.dtype.itemsize]
    return int((np.ascontiguousarray(value).view(view) & magnitude).max()) < exponent


class BadSampleError(DataError, ValueError):
    """A sample whose latents or caption embedding are not finite, have the wrong shape or do not decode."""


def bad_sample_message(err: BaseException) -> str:
    """The one-line message of a BadSampleError, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    prefix = f"{BadSampleError.__module__}.{BadSampleError.__name__}: "
    found = [line[len(prefix):] for line in lines if line.startswith(prefix)]
    return found[-1] if found else (lines[-1] if lines else repr(err))


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

    Every sample is checked as it is read, in the loader's workers: latents and caption embedding must decode, have
    the shards' shapes and be finite. A bad one raises BadSampleError naming stream, shard and sample; with
    `skip_bad_samples` it is replaced by the next good sample in dataset order (so which samples are skipped depends
    on the data alone), and the skipped ones are listed in the sample's "skipped" entry.

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
        skip_bad_samples: bool = False,
        **streaming_kwargs: Any,
    ) -> None:
        if not 0.0 <= caption_drop_prob <= 1.0:
            raise ValueError(f"caption_drop_prob must be in [0, 1], got {caption_drop_prob}")
        super().__init__(streams=streams, shuffle_seed=seed, **streaming_kwargs)
        self.resolution = int(resolution)
        self.latent_key = latent_column(resolution)
        self.caption_drop_prob = float(caption_drop_prob)
        self.drop_seed = int(seed)
        self.skip_bad_samples = bool(skip_bad_samples)
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

    def _where(self, sample_id: int) -> dict[str, Any]:
        """Stream, shard file and index in that shard of a global sample index."""
        shard_id, in_shard = self.spanner[sample_id]
        stream = self.streams[self.stream_per_shard[shard_id]]
        return {"stream": stream.remote or stream.local, "shard": self.shards[shard_id].raw_data.basename,
                "sample": int(in_shard), "index": int(sample_id)}

    def _problem(self, sample: dict[str, Any]) -> str | None:
        """What is wrong with a decoded sample's arrays (shape, non-finite values), or None."""
        for key, spec in ((self.latent_key, self.latent_spec), (CAPTION_EMB, self.caption_spec)):
            value = np.asarray(sample[key])
            if value.shape != spec.shape:
                return f"{key} has shape {value.shape}, the index says {spec.shape}"
            if not all_finite(value):
                return f"{key} holds {int(value.size - np.isfinite(value).sum())} non-finite values of {value.size}"
        return None

    def _read_checked(self, sample_id: int, retry: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(sample, None) for a good sample, (None, a record naming stream, shard, sample and problem) for a bad one."""
        try:
            with np.errstate(over="raise", invalid="raise"):
                sample = super().get_item(sample_id, retry)
        except DECODE_ERRORS as err:
            return None, {**self._where(sample_id), "id": None,
                          "problem": f"does not decode ({type(err).__name__}: {err})"}
        problem = self._problem(sample)
        if problem is None:
            return sample, None
        return None, {**self._where(sample_id), "id": sample.get(SAMPLE_ID), "problem": problem}

    def _good_sample(self, sample_id: int, retry: int) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
        """The sample at `sample_id`, or with skip_bad_samples the next good one: (sample, its index, [the bad
        sample it replaces] or []). Bad samples passed over on the way are listed by their own index's read."""
        replaced: list[dict[str, Any]] = []
        for step in range(self.num_samples):
            index = (sample_id + step) % self.num_samples
            sample, bad = self._read_checked(index, retry)
            if bad is None:
                return sample, index, replaced
            if not self.skip_bad_samples:
                raise BadSampleError(
                    f"bad sample in stream {bad['stream']}, shard {bad['shard']}, sample {bad['sample']} "
                    f"(dataset index {bad['index']}, id {bad['id']!r}): {bad['problem']}. Check the shards with "
                    "`micro-diffusion data verify DIR`, or set data.skip_bad_samples=true to skip such samples")
            if step == 0:
                replaced.append(bad)
        raise BadSampleError(f"every sample of the dataset is bad (the first: {replaced[0]})")

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """One checked, decoded sample with caption dropout applied; arrays stay float16 views until collation."""
        sample, sample_id, skipped = self._good_sample(sample_id, retry)  # dropout follows the sample actually read
        caption = sample[CAPTION]
        if self.caption_drop_prob > 0 and dropout_draw(self.drop_seed, self._epoch, sample_id) < self.caption_drop_prob:
            caption_emb, caption = self.null_caption, ""  # (L, D)
        else:
            caption_emb = sample[CAPTION_EMB]  # (L, D)
        return {"latents": sample[self.latent_key], "caption_emb": caption_emb, "caption": caption,
                "id": sample[SAMPLE_ID], "skipped": skipped}


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: latents (B,C,h,w) and caption_emb (B,L,D) float32 tensors, caption and id lists,
    and per sample the list of bad samples skipped in its place ("skipped", empty unless skip_bad_samples)."""
    # Stacking the shard's float16 views, then one conversion, touches the least memory: the decoded arrays are
    # read-only views of the shard bytes, so the stack is the one copy they need (torch.stack of per-sample float32
    # tensors was ~3x slower and collapses when torch's intra-op threads compete with other processes).
    latents = torch.from_numpy(np.stack([s["latents"] for s in samples])).float()  # (B, C, h, w)
    caption_emb = torch.from_numpy(np.stack([s["caption_emb"] for s in samples])).float()  # (B, L, D)
    return {"latents": latents, "caption_emb": caption_emb, "caption": [s["caption"] for s in samples],
            "id": [s["id"] for s in samples], "skipped": [s["skipped"] for s in samples]}
