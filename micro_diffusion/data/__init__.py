"""Latent-shard schema and the streaming training loader (mixing, caption dropout, deterministic resumption)."""
from micro_diffusion.data.dataset import LatentDataset, collate_latents, dropout_draw
from micro_diffusion.data.loader import build_dataloader, make_streams
from micro_diffusion.data.schema import (
    CAPTION,
    CAPTION_EMB,
    ENCODERS_FILE,
    NULL_CAPTION_FILE,
    SAMPLE_ID,
    ArraySpec,
    latent_column,
    parse_ndarray_encoding,
    read_index_columns,
)

__all__ = [
    "CAPTION",
    "CAPTION_EMB",
    "ENCODERS_FILE",
    "NULL_CAPTION_FILE",
    "SAMPLE_ID",
    "ArraySpec",
    "LatentDataset",
    "build_dataloader",
    "collate_latents",
    "dropout_draw",
    "latent_column",
    "make_streams",
    "parse_ndarray_encoding",
    "read_index_columns",
]
