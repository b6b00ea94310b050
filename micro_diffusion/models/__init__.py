"""The MicroDiT network: blocks, patch-mixer, deferred masking, MoE, layer-wise scaling and presets."""
from .dit import DiTConfig, DiTOutput, MicroDiT
from .presets import create_dit, list_presets, preset_config

__all__ = ["DiTConfig", "DiTOutput", "MicroDiT", "create_dit", "list_presets", "preset_config"]
