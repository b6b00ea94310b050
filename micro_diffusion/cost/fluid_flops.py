"""Analytic FLOPs of a Fluid network: forward by part, training per sample, sampling per image.

Counted as cost/flops.py counts MicroDiT and as torch's FlopCounterMode counts: 2*m*n*k per matrix product (QK^T and
AV included, in full also for causal attention, since the masked scores are still computed), element-wise work not
counted. Backward: twice the forward, except for the layers whose input carries no gradient (the caption projection,
the token embedding, the head's input projection and first step-MLP layer): those compute only their weight
gradient, once their forward. Every width is read from the built modules.
"""
from __future__ import annotations

import math

from torch import nn

from ..diffusion.fluid import expected_masked
from ..models.fluid import AlignerBlock, Fluid, FluidBlock, Mlp
from ..models.patches import patch_grid
from .flops import _linear, cross_attention_flops, self_attention_flops


def _check(net: Fluid, caption_len: int) -> None:
    if not isinstance(net, Fluid):
        raise TypeError(f"expected a Fluid from create_fluid, got {type(net).__name__}")
    if caption_len < 1:
        raise ValueError(f"caption_len must be positive, got {caption_len}")


def _tokens(net: Fluid, latent_size: int | tuple[int, int]) -> int:
    gh, gw = patch_grid(latent_size, net.patch_size)
    return gh * gw


def _mlp(mlp: Mlp, tokens: int) -> int:
    return _linear(mlp.fc1, tokens) + _linear(mlp.fc2, tokens)


def aligner_block_flops(block: AlignerBlock, caption_len: int) -> int:
    """Self-attention and MLP over the caption tokens."""
    return self_attention_flops(block.attn, caption_len) + _mlp(block.mlp, caption_len)


def fluid_block_flops(block: FluidBlock, tokens: int, caption_len: int) -> int:
    """Self-attention over T tokens, cross-attention to L text tokens (keys and values included), MLP."""
    attn = self_attention_flops(block.attn, tokens) + cross_attention_flops(block.cross, tokens, caption_len)
    return attn + _mlp(block.mlp, tokens)


def fluid_forward_flops(net: Fluid, latent_size: int | tuple[int, int], caption_len: int) -> dict[str, int]:
    """Forward FLOPs of one sample by part: the text aligner, the transformer over all T tokens, and "head" = 0
    (the head runs per token; see fluid_head_flops)."""
    _check(net, caption_len)
    T = _tokens(net, latent_size)
    aligner = _linear(net.caption_proj, caption_len) + sum(aligner_block_flops(b, caption_len) for b in net.aligner)
    transformer = _linear(net.token_embed, T) + sum(fluid_block_flops(b, T, caption_len) for b in net.blocks)
    return {"aligner": aligner, "transformer": transformer, "head": 0}


def fluid_head_flops(net: Fluid) -> int:
    """Forward FLOPs of one head evaluation on one token: input projection, step MLP, condition embedding, residual
    blocks and final layer (every Linear of the head, on one row)."""
    return sum(_linear(m, 1) for m in net.head.modules() if isinstance(m, nn.Linear))


def _no_input_grad_flops(net: Fluid, tokens: int, caption_len: int, head_rows: float) -> float:
    """Forward FLOPs of the layers whose input needs no gradient: their backward is the weight gradient alone."""
    head = _linear(net.head.input_proj, 1) + _linear(net.head.time_embed.mlp[0], 1)
    return _linear(net.caption_proj, caption_len) + _linear(net.token_embed, tokens) + head_rows * head


def masked_tokens(net: Fluid, tokens: int, mask_ratio: float | None = None) -> float:
    """Tokens the training loss runs the head on: ceil(T r) in random order (its expectation over the mask-ratio
    distribution when r is None), all T in raster order."""
    if net.cfg.order == "raster":
        return float(tokens)
    if mask_ratio is None:
        return expected_masked(tokens)
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1], got {mask_ratio}")
    return float(math.ceil(tokens * mask_ratio))


def fluid_train_flops_per_sample(
    net: Fluid, latent_size: int | tuple[int, int], caption_len: int, mask_ratio: float | None = None
) -> int:
    """Forward plus backward FLOPs of one training sample: aligner and transformer over T tokens, and the head on
    each masked token diffusion_batch_mul times (mask_ratio None: the expected count over the ratio's law)."""
    fwd = fluid_forward_flops(net, latent_size, caption_len)
    T = _tokens(net, latent_size)
    rows = masked_tokens(net, T, mask_ratio) * net.cfg.diffusion_batch_mul  # head evaluations per sample
    forward = fwd["aligner"] + fwd["transformer"] + rows * fluid_head_flops(net)
    return round(3 * forward - _no_input_grad_flops(net, T, caption_len, rows))  # their input gradient never runs


def fluid_sample_flops_per_image(
    net: Fluid,
    latent_size: int | tuple[int, int],
    caption_len: int,
    steps: int,
    head_steps: int,
    guidance: bool = True,
) -> int:
    """Forward FLOPs of sampling one image: the aligner once, the transformer on all T tokens at each of `steps`
    steps, and head_steps head evaluations for every token (each revealed once); all doubled by guidance."""
    fwd = fluid_forward_flops(net, latent_size, caption_len)
    T = _tokens(net, latent_size)
    if steps < 1 or head_steps < 1:
        raise ValueError(f"steps and head_steps must be positive, got {steps} and {head_steps}")
    if net.cfg.order == "raster" and steps != T:
        raise ValueError(f"raster order reveals one token a step: steps must be {T} (the tokens), got {steps}")
    g = 2 if guidance else 1
    return g * (fwd["aligner"] + steps * fwd["transformer"] + T * head_steps * fluid_head_flops(net))
