"""build_dataloader: mixed latent streams -> a resumable StreamingDataLoader of training batches."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader

from micro_diffusion.data.dataset import LatentDataset, collate_latents
from micro_diffusion.data.integrity import check_streams
from micro_diffusion.data.shm import remove_dead_leftovers
from micro_diffusion.utils.devices import loader_workers

STREAM_KEYS = frozenset({"local", "remote", "proportion"})
# Arguments build_dataloader sets itself; passing them again through **streaming_options would be ambiguous.
RESERVED_OPTIONS = frozenset({"streams", "remote", "local", "batch_size", "shuffle", "shuffle_seed"})


def make_streams(streams: Sequence[Mapping[str, Any]]) -> list[Stream]:
    """Turn stream dicts {"local", "remote", "proportion"} into Streaming `Stream`s, checking keys and proportions."""
    if not streams:
        raise ValueError("streams is empty: give at least one {'local': dir, 'remote': ..., 'proportion': ...}")
    out = []
    for i, spec in enumerate(streams):
        unknown = set(spec) - STREAM_KEYS
        if unknown:
            raise ValueError(f"streams[{i}]: unknown keys {sorted(unknown)} (allowed: {sorted(STREAM_KEYS)})")
        if spec.get("local") is None and spec.get("remote") is None:
            raise ValueError(f"streams[{i}]: needs 'local' or 'remote'")
        out.append(Stream(local=spec.get("local"), remote=spec.get("remote"), proportion=spec.get("proportion")))
    given = [s.get("proportion") is not None for s in streams]
    if any(given) and not all(given):
        raise ValueError(f"streams: give a proportion for every stream or for none (given for: {given})")
    return out


def build_dataloader(
    streams: Sequence[Mapping[str, Any]],
    batch_size: int,
    resolution: int,
    caption_drop_prob: float = 0.1,
    null_caption: np.ndarray | None = None,
    shuffle: bool = True,
    seed: int = 17,
    num_workers: int = 2,
    drop_last: bool = True,
    verify: str = "size",
    skip_bad_samples: bool = False,
    **streaming_options: Any,
) -> StreamingDataLoader:
    """Build the training loader over precomputed latent shards.

    Args:
        streams: one dict per dataset: "local" (cache or shard dir), "remote" (None, or s3://, gs://, ... where the
            shards live), "proportion" (relative share of each epoch; give it for all streams or none).
        batch_size: samples per batch on this rank (the per-device batch).
        resolution: image resolution whose `latents_{resolution}` column is read.
        caption_drop_prob: probability of replacing a caption embedding with the null caption's (classifier-free
            guidance training); deterministic per (seed, epoch, sample).
        null_caption: (L, D) embedding of the empty caption; default: null_caption.npy beside the first stream.
        shuffle: shuffle samples each epoch (Streaming's shuffle, seeded by `seed`).
        seed: seed of the shuffle and of the caption dropout.
        num_workers: DataLoader worker processes per rank, at most this rank's share of the machine's usable CPUs
            (utils.devices.loader_workers); 0 loads in the main process.
        drop_last: drop the last incomplete batch.
        verify: "size" checks every local shard's size against its index before anything is read; "hashes" also
            checks each shard's recorded hash (reads every local shard once). Damage raises DamagedShardError.
        skip_bad_samples: replace a sample that does not decode, has the wrong shape or is not finite by the next
            good one (listed in the batch's "skipped"), instead of raising BadSampleError naming it.
        **streaming_options: further StreamingDataset arguments (predownload, cache_limit, shuffle_algo,
            num_canonical_nodes, epoch_size, batching_method, ...).

    Returns:
        A StreamingDataLoader yielding {"latents": float32 (B,C,h,w), "caption_emb": float32 (B,L,D),
        "caption": list[str], "id": list[str], "skipped": per sample, the bad samples read in its place};
        its state_dict/load_state_dict resume mid-epoch.
    """
    clash = RESERVED_OPTIONS & set(streaming_options)
    if clash:
        raise ValueError(f"streaming_options may not set {sorted(clash)}: build_dataloader sets them itself")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    stream_objs = make_streams(streams)
    check_streams(streams, verify)  # before Streaming reads an index or a shard
    removed = remove_dead_leftovers()  # a killed run's shared memory would pile up (and can stall a new one)
    if removed:
        print(f"removed {len(removed)} Streaming shared-memory files left by dead processes "
              f"({', '.join(sorted({p.name[:6] for p in removed}))})", flush=True)
    dataset = LatentDataset(
        streams=stream_objs,
        resolution=resolution,
        caption_drop_prob=caption_drop_prob,
        null_caption=null_caption,
        seed=seed,
        skip_bad_samples=skip_bad_samples,
        shuffle=shuffle,
        batch_size=batch_size,
        **streaming_options,
    )
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=loader_workers(num_workers),
        drop_last=drop_last,
        collate_fn=collate_latents,
        pin_memory=torch.cuda.is_available(),  # page-locked batches make the host-to-GPU copy asynchronous
        persistent_workers=False,
    )
