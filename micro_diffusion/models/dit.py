"""MicroDiT: a patch-mixer on all patches, deferred masking, then a layer-wise scaled backbone with MoE FFNs and,
in training, optional TREAD token routing around spans of backbone blocks; or, without the mixer, SPRINT's dense
encoder, sparse middle and dense decoder joined by a fusion."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .blocks import DiTBlock, FinalLayer
from .embeddings import CaptionEmbed, NoiseEmbed, PatchEmbed, sincos_2d
from .ffn import ExpertChoiceMoE
from .masking import draw_keep, gather_tokens, scatter_tokens
from .patches import keep_pixels, patch_grid, unpatchify
from .routing import check_routes, draw_spans, end_route, start_route
from .sprint import ConcatLinearFusion, check_sprint, sprint_on


@dataclass
class DiTConfig:
    """Every size and switch of the network; presets fill it, overrides change any field."""

    width: int = 1024  # backbone width D
    depth: int = 28  # backbone blocks
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 4
    latent_size: int | tuple[int, int] = 32  # (H, W) of the latent the positions are built for
    caption_dim: int = 1024
    attn_mult: tuple[float, float] = (0.5, 1.0)  # layer-wise scaling: first and last block
    ffn_mult: tuple[float, float] = (0.5, 4.0)
    moe_every: int = 2  # MoE in blocks with index % moe_every == moe_every - 1, never the last; 0 disables
    num_experts: int = 8
    capacity_factor: float = 2.0
    patch_mixer_depth: int = 6  # 0 gives naive masking: patches dropped right after the embedding
    patch_mixer_width: int = 768
    mixer_ffn_mult: float = 4.0
    pos_base_grid: int = 16  # patch grid at which positions are uninterpolated (16 = 256 px with an 8x VAE, p=2)
    # TREAD routes (start, end, ratio): in training, int(T x ratio) tokens skip backbone blocks start..end (0-based,
    # inclusive); no parameters, so routed and unrouted networks share weights
    routes: tuple[tuple[int, int, float], ...] = ()
    # SPRINT: the first e backbone blocks on all tokens, the middle on the kept ones (the forward's mask_ratio), a
    # fusion, then the last d blocks on all tokens; 0/0 = off; needs patch_mixer_depth 0 and no routes
    sprint_encoder_depth: int = 0
    sprint_decoder_depth: int = 0
    sprint_fusion: str = "concat_linear"

    def __post_init__(self) -> None:
        self.routes = check_routes(self.routes, self.depth)  # lists (YAML, JSON) become tuples; errors name the route
        check_sprint(self.sprint_encoder_depth, self.sprint_decoder_depth, self.sprint_fusion, self.depth,
                     self.patch_mixer_depth, self.routes)

    @property
    def sprint(self) -> bool:
        """Whether the network is SPRINT's dense-sparse-dense split."""
        return sprint_on(self.sprint_encoder_depth, self.sprint_decoder_depth)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (H/p, W/p) of the configured latent size."""
        return patch_grid(self.latent_size, self.patch_size)

    def to_dict(self) -> dict:
        """Plain, JSON-ready copy."""
        return asdict(self)


@dataclass
class DiTOutput:
    """The network's prediction and, when it masked patches, which ones and the pixels they cover."""

    sample: torch.Tensor  # (N, C, H, W)
    mask: torch.Tensor | None  # (N, T) bool, True where a patch was dropped; None without masking
    # (N, 1, H, W) float, 1 on pixels of kept patches; None when every patch is predicted (no masking, or SPRINT,
    # whose decoder restores every token: the loss covers all of them)
    keep: torch.Tensor | None


def _trunc(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, std=std)


def _init_block(attn: nn.Module, cross: nn.Module | None, ffn: nn.Module, std: float) -> None:
    """Inputs of attention and FFN (and MoE router) at std 0.02; output projections (and SwiGLU's up half) at std."""
    _trunc(attn.qkv.weight, 0.02)
    _trunc(attn.proj.weight, std)
    if cross is not None:
        for w, s in ((cross.q.weight, 0.02), (cross.kv.weight, 0.02), (cross.proj.weight, std)):
            _trunc(w, s)
    if isinstance(ffn, ExpertChoiceMoE):
        for w, s in ((ffn.router.weight, 0.02), (ffn.w_in, 0.02), (ffn.w_out, std)):
            _trunc(w, s)
    else:
        gate, up = ffn.w_in.weight.data.chunk(2, dim=0)  # (hidden, D) each: views into the fused matrix
        for w, s in ((gate, 0.02), (up, std), (ffn.w_out.weight, std)):
            _trunc(w, s)


def _width_map(d_in: int, d_out: int) -> nn.Module:
    """LayerNorm then a bias-free linear between widths; nothing when the widths agree."""
    if d_in == d_out:
        return nn.Identity()
    return nn.Sequential(nn.LayerNorm(d_in, eps=1e-6, bias=False), nn.Linear(d_in, d_out, bias=False))


class MicroDiT(nn.Module):
    """The sparse text-to-image DiT of 'Stretching Each Dollar'; each part is described in docs/interfaces.md."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg, D, p = cfg, cfg.width, cfg.patch_size
        self.patch_size, self.in_channels = p, cfg.in_channels
        self.patch_embed = PatchEmbed(cfg.in_channels, D, p)
        self.noise_embed = NoiseEmbed(D)
        self.caption_embed = CaptionEmbed(cfg.caption_dim, D, cfg.head_dim)
        self.mixer = nn.ModuleList()
        if cfg.patch_mixer_depth > 0:
            Dm = cfg.patch_mixer_width
            self.mixer_in, self.mixer_caption, self.mixer_out = _width_map(D, Dm), _width_map(D, Dm), _width_map(Dm, D)
            for i in range(cfg.patch_mixer_depth):  # MoE at odd indices, all but the first (block 0)
                moe = cfg.moe_every > 0 and i % cfg.moe_every == cfg.moe_every - 1 and i > 0
                self.mixer.append(self._block(Dm, 1.0, cfg.mixer_ffn_mult, moe))
        attn_mults = np.linspace(*cfg.attn_mult, cfg.depth)
        ffn_mults = np.linspace(*cfg.ffn_mult, cfg.depth)
        self.blocks = nn.ModuleList(
            self._block(D, float(attn_mults[i]), float(ffn_mults[i]), self._backbone_moe(i)) for i in range(cfg.depth)
        )
        self.fusion = ConcatLinearFusion(D) if cfg.sprint else None  # the only fusion check_sprint accepts
        self.final = FinalLayer(D, p, cfg.in_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def _backbone_moe(self, i: int) -> bool:
        every = self.cfg.moe_every
        return every > 0 and i % every == every - 1 and i != self.cfg.depth - 1

    def _block(self, dim: int, attn_mult: float, ffn_mult: float, moe: bool) -> DiTBlock:
        c = self.cfg
        return DiTBlock(dim, c.width, c.head_dim, attn_mult, ffn_mult, moe, c.num_experts, c.capacity_factor)

    def initialize_weights(self) -> None:
        """The released network's init: xavier linears, then std 0.02 (truncated normal) for inputs and routers,
        the block's std for output projections, zero adaLN, zero caption-block outputs and a zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        ce = self.caption_embed
        for lin in (self.noise_embed.mlp[0], self.noise_embed.mlp[2], ce.proj[0], ce.proj[3], ce.pool[0], ce.pool[3]):
            nn.init.normal_(lin.weight, std=0.02)
        mixer_std = 0.02 / math.sqrt(2 * self.cfg.depth)  # mixer blocks: not depth-scaled
        for std, block in [(mixer_std, b) for b in self.mixer] + [
                (0.02 / math.sqrt(2 * (i + 1)), b) for i, b in enumerate(self.blocks)]:
            _init_block(block.attn, block.cross, block.ffn, std)
            nn.init.zeros_(block.adaLN[-1].weight)
        _init_block(ce.block.attn, None, ce.block.ffn, 0.02)
        for weight in (ce.block.attn.proj.weight, ce.block.ffn.w_out.weight):  # the caption block starts as identity
            nn.init.zeros_(weight)
        for lin in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.fusion is not None:  # its Linear took xavier above; the fill token is drawn last
            self.fusion.reset_fill()

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Computed 2D sin-cos positions (T, D); interpolated so a grid larger than the base spans the same range."""
        key = (grid_h, grid_w, device, dtype)
        if key not in self._pos_cache:  # a plain dict, not a buffer: positions stay out of the state dict
            scale = max(max(grid_h, grid_w) / self.cfg.pos_base_grid, 1.0)
            self._pos_cache[key] = sincos_2d(self.cfg.width, grid_h, grid_w, scale).to(device, dtype)
        return self._pos_cache[key]

    def _backbone(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor,
                  spans: dict[int, tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The backbone blocks; at a span's first block its routed tokens step aside, and after its last block they
        rejoin at their positions with the values they had before it (routes never overlap)."""
        end, idx, before = -1, None, None
        for i, block in enumerate(self.blocks):
            if i in spans:
                (end, idx), before = spans[i], x  # before: (N, K, D)
                x = start_route(x, idx)  # (N, K_span, D)
            x = block(x, c, y)  # (N, K or K_span, D)
            if i == end:
                x = end_route(x, idx, before)  # (N, K, D)
        return x

    def _sprint(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, mask_ratio: float,
                generator: torch.Generator | None, drop_path: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SPRINT's backbone: dense encoder, the patch draw, sparse middle, fusion, dense decoder; (N, T, D) in and out,
        and the mask (N, T) of the tokens the middle dropped (None at mask_ratio 0). `drop_path` skips the middle."""
        e, d = self.cfg.sprint_encoder_depth, self.cfg.sprint_decoder_depth
        N, T, _ = x.shape
        for block in self.blocks[:e]:
            x = block(x, c, y)  # (N, T, D)
        mask = None
        if drop_path:  # Path-Drop Guidance: no middle; the fusion sees the fill token at every position, as SPRINT's
            x = self.fusion(self.fusion.fill.to(x.dtype).expand_as(x), x, None)  # (N, T, D)
        else:
            dense, keep = x, None
            if mask_ratio > 0:
                keep, mask = draw_keep(N, T, mask_ratio, x.device, generator)  # (N, K), (N, T)
                x = gather_tokens(x, keep)  # (N, K, D)
            for block in self.blocks[e:len(self.blocks) - d]:
                x = block(x, c, y)  # (N, K, D)
            x = self.fusion(x, dense, keep)  # (N, T, D)
        for block in self.blocks[len(self.blocks) - d:]:
            x = block(x, c, y)  # (N, T, D)
        return x, mask

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        caption_tokens: torch.Tensor,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        drop_path: bool = False,
    ) -> DiTOutput:
        """The prediction for noisy latents x (N, C, H, W); `drop_path` (SPRINT only, unmasked) skips the sparse
        middle blocks, the unconditional branch of Path-Drop Guidance."""
        if drop_path and self.fusion is None:
            raise ValueError("drop_path (Path-Drop Guidance) needs a SPRINT network (sprint_encoder_depth / "
                             "sprint_decoder_depth); this one has none")
        if drop_path and mask_ratio > 0:
            raise ValueError(f"drop_path skips the sparse middle and draws no mask: mask_ratio must be 0, got "
                             f"{mask_ratio}")
        N, _, H, W = x.shape
        gh, gw = patch_grid((H, W), self.patch_size)
        x = self.patch_embed(x) + self.pos_embed(gh, gw, x.device, x.dtype)  # (N, T, D)
        y, pooled = self.caption_embed(caption_tokens)  # (N, L, D), (N, D)
        c = self.noise_embed(c_noise).to(pooled.dtype) + pooled  # (N, D)
        if self.fusion is not None:  # SPRINT: every token reaches the final layer, so the loss covers all of them
            x, mask = self._sprint(x, c, y, mask_ratio, generator, drop_path)  # (N, T, D), (N, T) or None
            sample = unpatchify(self.final(x, c), (gh, gw), self.patch_size, self.in_channels)
            return DiTOutput(sample=sample, mask=mask, keep=None)
        if len(self.mixer):
            x, ym = self.mixer_in(x), self.mixer_caption(y)  # (N, T, Dm), (N, L, Dm)
            for block in self.mixer:
                x = block(x, c, ym)  # (N, T, Dm): the mixer sees every patch
        keep = mask = None
        if mask_ratio > 0:
            keep, mask = draw_keep(N, gh * gw, mask_ratio, x.device, generator)  # (N, K), (N, T)
            x = gather_tokens(x, keep)  # (N, K, Dm)
        if len(self.mixer):
            x = self.mixer_out(x)  # (N, K, D): back to backbone width after masking
        # Routes act on the tokens the backbone sees (the kept ones under deferred masking). Every route is drawn here,
        # after the patch draw and outside the blocks, so a checkpointed block's recomputation never draws again.
        spans = draw_spans(self.cfg.routes, N, x.shape[1], x.device, generator) if self.training else {}
        x = self._backbone(x, c, y, spans)  # (N, K, D)
        x = self.final(x, c)  # (N, K, p*p*C)
        if keep is not None:  # dropped patches predict zeros, as the released network's zero mask token
            x = scatter_tokens(x, keep, gh * gw, x.new_zeros(x.shape[-1]))  # (N, T, p*p*C)
        keep_px = None if mask is None else keep_pixels(mask, (gh, gw), self.patch_size)  # (N, 1, H, W)
        return DiTOutput(sample=unpatchify(x, (gh, gw), self.patch_size, self.in_channels), mask=mask, keep=keep_px)
