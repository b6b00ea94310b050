"""Analytic FLOPs of a MicroDiT: forward, forward+backward per training sample, and per sampled image.

Counted as torch's FlopCounterMode counts them: 2*m*n*k per matrix product (the attention products QK^T and AV
included), the backward pass twice the forward, element-wise work (norms, activations, softmax, gathers) not counted.
The walk reads every width from the built modules, so any preset or override is counted as built. TREAD routes
(DiTConfig.routes) act in training only: a training forward counts a route's blocks on the tokens it keeps, a
sampling forward counts every block on every token the backbone sees. SPRINT (DiTConfig.sprint_encoder_depth and
sprint_decoder_depth) counts its dense encoder and decoder blocks, the fusion and the final layer on every token and
its middle blocks on the kept ones, in training and sampling alike (the mask ratio decides, as in the forward).
Path-Drop Guidance (guidance_mode "path_drop") counts the unconditional evaluations without the middle blocks.
"""
from __future__ import annotations

from torch import nn

from ..diffusion.sampling import DEFAULTS, GUIDANCE_MODES, network_evals
from ..models.attention import CrossAttention, SelfAttention
from ..models.blocks import DiTBlock, FinalLayer
from ..models.dit import MicroDiT
from ..models.embeddings import CaptionBlock, CaptionEmbed, NoiseEmbed, PatchEmbed
from ..models.ffn import ExpertChoiceMoE, SwiGLU
from ..models.masking import num_kept
from ..models.patches import patch_grid
from ..models.routing import num_routed


def _linear(lin: nn.Module, tokens: int) -> int:
    """A Linear applied to `tokens` rows; an Identity or LayerNorm+Linear map counts its linear only."""
    if isinstance(lin, nn.Identity):
        return 0
    if isinstance(lin, nn.Sequential):
        return sum(_linear(m, tokens) for m in lin if isinstance(m, nn.Linear))
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"cannot count FLOPs of {type(lin).__name__}: expected Linear, Identity or Sequential")
    return 2 * tokens * lin.in_features * lin.out_features


def self_attention_flops(attn: SelfAttention, tokens: int) -> int:
    """qkv projection, QK^T, AV and the output projection over `tokens` tokens."""
    width = attn.heads * attn.head_dim
    products = 2 * (2 * tokens * tokens * width)  # QK^T (T x d x T per head) and AV (T x T x d per head)
    return _linear(attn.qkv, tokens) + products + _linear(attn.proj, tokens)


def cross_attention_flops(attn: CrossAttention, tokens: int, caption_len: int) -> int:
    """q on image tokens, kv on caption tokens, QK^T and AV of T x L, and the output projection."""
    width = attn.heads * attn.head_dim
    products = 2 * (2 * tokens * caption_len * width)
    return _linear(attn.q, tokens) + _linear(attn.kv, caption_len) + products + _linear(attn.proj, tokens)


def ffn_flops(ffn: nn.Module, tokens: int) -> int:
    """Dense SwiGLU on every token, or MoE: the router on every token and each expert on its `capacity` tokens."""
    if isinstance(ffn, SwiGLU):
        return _linear(ffn.w_in, tokens) + _linear(ffn.w_out, tokens)
    if isinstance(ffn, ExpertChoiceMoE):
        experts, dim, hidden = ffn.w_in.shape
        routed = experts * ffn.capacity(tokens)  # E x C token slots per sample
        return _linear(ffn.router, tokens) + 2 * routed * (dim * hidden + hidden * dim)
    raise TypeError(f"cannot count FLOPs of FFN {type(ffn).__name__}")


def block_flops(block: DiTBlock, tokens: int, caption_len: int) -> int:
    """One DiT block on `tokens` image tokens; its adaLN runs once per sample, not per token."""
    return (
        _linear(block.adaLN[-1], 1)
        + self_attention_flops(block.attn, tokens)
        + cross_attention_flops(block.cross, tokens, caption_len)
        + ffn_flops(block.ffn, tokens)
    )


def _caption_flops(embed: CaptionEmbed, caption_len: int) -> int:
    block: CaptionBlock = embed.block
    proj = sum(_linear(m, caption_len) for m in embed.proj if isinstance(m, nn.Linear))
    attn = self_attention_flops(block.attn, caption_len) + ffn_flops(block.ffn, caption_len)
    pool = sum(_linear(m, 1) for m in embed.pool if isinstance(m, nn.Linear))  # on the mean-pooled vector
    return proj + attn + pool


def _embed_flops(patch: PatchEmbed, noise: NoiseEmbed, tokens: int) -> int:
    conv = patch.proj
    patch_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    noise_mlp = sum(_linear(m, 1) for m in noise.mlp if isinstance(m, nn.Linear))
    return 2 * tokens * patch_in * conv.out_channels + noise_mlp


def _final_flops(final: FinalLayer, tokens: int) -> int:
    return _linear(final.adaLN[-1], 1) + _linear(final.linear, tokens)


def _grid_tokens(net: MicroDiT, latent_size: int | tuple[int, int]) -> int:
    gh, gw = patch_grid(latent_size, net.patch_size)
    return gh * gw


def backbone_tokens(net: MicroDiT, tokens: int, training: bool, all_tokens: int | None = None) -> list[int]:
    """Tokens each backbone block runs on, from the `tokens` the backbone sees: in training, a route's blocks run on
    the tokens it does not route (T - int(T x ratio)); in evaluation every block runs on all of them. Under SPRINT
    the encoder and decoder blocks run on `all_tokens` (the patch grid's T; default `tokens`), the middle on
    `tokens`."""
    if net.cfg.sprint:
        e, d, depth = net.cfg.sprint_encoder_depth, net.cfg.sprint_decoder_depth, len(net.blocks)
        T = tokens if all_tokens is None else all_tokens
        return [T] * e + [tokens] * (depth - e - d) + [T] * d
    per_block = [tokens] * len(net.blocks)
    for start, end, ratio in net.cfg.routes if training else ():
        per_block[start:end + 1] = [tokens - num_routed(tokens, ratio)] * (end + 1 - start)
    return per_block


def forward_flops_breakdown(
    net: MicroDiT, latent_size: int | tuple[int, int], caption_len: int, mask_ratio: float = 0.0,
    training: bool = False,
) -> dict[str, int]:
    """Forward FLOPs of one sample, by part: embed, caption, mixer, backbone, fusion (SPRINT), final; `training`
    applies the routes."""
    if not isinstance(net, MicroDiT):
        raise TypeError(f"expected a MicroDiT from create_dit, got {type(net).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    if caption_len < 1:
        raise ValueError(f"caption_len must be positive, got {caption_len}")
    T = _grid_tokens(net, latent_size)
    K = num_kept(T, mask_ratio) if mask_ratio > 0 else T  # the network draws no mask at ratio 0
    mixer = 0
    if len(net.mixer):
        mixer = _linear(net.mixer_in, T) + _linear(net.mixer_caption, caption_len) + _linear(net.mixer_out, K)
        mixer += sum(block_flops(b, T, caption_len) for b in net.mixer)  # the mixer sees every patch
    sprint = net.fusion is not None
    return {
        "embed": _embed_flops(net.patch_embed, net.noise_embed, T),
        "caption": _caption_flops(net.caption_embed, caption_len),
        "mixer": mixer,
        "backbone": sum(block_flops(b, n, caption_len)
                        for b, n in zip(net.blocks, backbone_tokens(net, K, training, T), strict=True)),
        "fusion": _linear(net.fusion.linear, T) if sprint else 0,  # Linear(2D -> D) on every token
        # on the kept tokens (dropped ones get zeros afterwards); under SPRINT on every token
        "final": _final_flops(net.final, T if sprint else K),
    }


def forward_flops(
    net: MicroDiT, latent_size: int | tuple[int, int], caption_len: int, mask_ratio: float = 0.0,
    training: bool = False,
) -> int:
    """Forward FLOPs of one sample (`training`: as a training forward runs, routes applied)."""
    return sum(forward_flops_breakdown(net, latent_size, caption_len, mask_ratio, training).values())


def train_flops_per_sample(
    net: MicroDiT, latent_size: int | tuple[int, int], caption_len: int, mask_ratio: float = 0.0
) -> int:
    """Forward plus backward FLOPs of one training sample (backward counted as twice the forward), routes applied."""
    return 3 * forward_flops(net, latent_size, caption_len, mask_ratio, training=True)


def caption_only_flops(net: MicroDiT, caption_len: int) -> int:
    """Forward FLOPs that depend on the caption alone: its embedding, cross-attention keys and values, the mixer map."""
    kv = sum(_linear(block.cross.kv, caption_len) for block in [*net.mixer, *net.blocks])
    mixer = _linear(net.mixer_caption, caption_len) if len(net.mixer) else 0
    return _caption_flops(net.caption_embed, caption_len) + kv + mixer


def jvp_flops(net: MicroDiT, latent_size: int | tuple[int, int], caption_len: int) -> int:
    """One forward-mode JVP in (x, t) of the unmasked forward, as FlopCounterMode counts torch.func.jvp.

    Every product on the path of x or t runs three times (the primal and the two tangent terms of its derivative);
    what depends on the caption alone carries no tangent and runs once.
    """
    return 3 * forward_flops(net, latent_size, caption_len) - 2 * caption_only_flops(net, caption_len)


def distill_flops_per_sample(net: MicroDiT, latent_size: int | tuple[int, int], caption_len: int,
                             guidance: bool = True, weight: nn.Module | None = None) -> int:
    """One consistency-distillation sample: the teacher's forward (twice with guidance), the student's JVP, the
    student's forward and backward, and the learned loss weighting's (Linear layers on one row per sample)."""
    teacher = (2 if guidance else 1) * forward_flops(net, latent_size, caption_len)
    weighting = 3 * sum(_linear(m, 1) for m in weight.modules() if isinstance(m, nn.Linear)) if weight else 0
    return teacher + jvp_flops(net, latent_size, caption_len) + train_flops_per_sample(
        net, latent_size, caption_len, 0.0) + weighting


def path_drop_flops(net: MicroDiT, latent_size: int | tuple[int, int], caption_len: int) -> int:
    """One unmasked forward of a SPRINT network without its sparse middle blocks (drop_path=True)."""
    if net.fusion is None:
        raise ValueError("path_drop counts a SPRINT network (sprint_encoder_depth / sprint_decoder_depth); this one "
                         "has none")
    T, e, d = _grid_tokens(net, latent_size), net.cfg.sprint_encoder_depth, net.cfg.sprint_decoder_depth
    middle = sum(block_flops(b, T, caption_len) for b in net.blocks[e:len(net.blocks) - d])
    return forward_flops(net, latent_size, caption_len) - middle


def sample_flops_per_image(
    net: MicroDiT,
    latent_size: int | tuple[int, int],
    caption_len: int,
    steps: int = DEFAULTS.steps,
    sampler: str = DEFAULTS.sampler,
    guidance: bool = True,
    guidance_mode: str = DEFAULTS.guidance_mode,
) -> int:
    """Forward FLOPs of sampling one image: evaluations x unmasked forward, plus with guidance the unconditional
    evaluations (the full forward for "cfg", the forward without the sparse middle for "path_drop")."""
    if guidance_mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance_mode {guidance_mode!r}; known: {', '.join(GUIDANCE_MODES)}")
    evals, full = network_evals(steps, sampler), forward_flops(net, latent_size, caption_len, mask_ratio=0.0)
    if not guidance:
        return evals * full
    uncond = path_drop_flops(net, latent_size, caption_len) if guidance_mode == "path_drop" else full
    return evals * (full + uncond)
