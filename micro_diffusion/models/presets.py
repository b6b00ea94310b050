"""Model sizes as one-line factories in a registry."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, Callable

from .dit import DiTConfig, MicroDiT

PRESETS: dict[str, Callable[[], DiTConfig]] = {}


def register(fn: Callable[[], DiTConfig]) -> Callable[[], DiTConfig]:
    """Add a preset under its function's name."""
    PRESETS[fn.__name__] = fn
    return fn


@register
def MicroDiT_Tiny_2() -> DiTConfig: return DiTConfig(width=512, depth=16, head_dim=32, patch_mixer_depth=4, patch_mixer_width=512)  # noqa: E501,E704
@register
def MicroDiT_S_2() -> DiTConfig: return DiTConfig(width=640, depth=18, head_dim=64, patch_mixer_depth=4, patch_mixer_width=512)  # noqa: E501,E704
@register
def MicroDiT_B_2() -> DiTConfig: return DiTConfig(width=768, depth=20, head_dim=64, patch_mixer_depth=4, patch_mixer_width=640)  # noqa: E501,E704
@register
def MicroDiT_L_2() -> DiTConfig: return DiTConfig(width=896, depth=24, head_dim=64, patch_mixer_depth=6, patch_mixer_width=768)  # noqa: E501,E704
@register
def MicroDiT_XL_2() -> DiTConfig: return DiTConfig(width=1024, depth=28, head_dim=64, patch_mixer_depth=6, patch_mixer_width=768)  # noqa: E501,E704


def list_presets() -> list[str]:
    """Names accepted by create_dit."""
    return list(PRESETS)


def configured(presets: Mapping[str, Callable[[], Any]], name: str, kind: str, **overrides: Any) -> Any:
    """A preset's config with fields overridden (lists, as YAML and JSON give pairs, become tuples); an unknown name
    or field raises naming it (`kind` names the family in the message)."""
    if name not in presets:
        raise KeyError(f"unknown {kind} preset {name!r}; known: {', '.join(presets)}")
    base = presets[name]()
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {kind} option(s) {unknown} for {name}; known: {sorted(known)}")
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def preset_config(name: str, **overrides) -> DiTConfig:
    """The preset's config with any fields overridden; unknown names or fields raise with the offending name."""
    return configured(PRESETS, name, "model", **overrides)


def create_dit(
    name: str, latent_size: int | tuple[int, int] = 32, in_channels: int = 4, caption_dim: int = 1024, **overrides
) -> MicroDiT:
    """Build a preset network.

    Args:
        name: a preset from list_presets(), e.g. "MicroDiT_XL_2".
        latent_size: latent side (int) or (H, W); positions are computed for any size at run time.
        in_channels: latent channels of the VAE (4 for SDXL's).
        caption_dim: width of the text encoder's token embeddings (1024 for DFN5B-CLIP-ViT-H-14).
        **overrides: any DiTConfig field, e.g. patch_mixer_depth=0 for the naive-masking baseline.
    """
    cfg = preset_config(name, latent_size=latent_size, in_channels=in_channels, caption_dim=caption_dim, **overrides)
    return MicroDiT(cfg)
