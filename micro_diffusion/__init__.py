"""micro_diffusion: train text-to-image sparse diffusion transformers from scratch on a micro budget."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Pipeline", "__version__", "load_exported"]


def load_exported(model_dir: str | Path, use_ema: bool | None = None, device: Any = "cpu") -> tuple[Any, dict, Any]:
    """(network in eval mode, config, null caption) of an exported model folder (micro_diffusion.exported).

    The import happens on the first call: `import micro_diffusion` stays free of torch and the network code.
    """
    from .exported import load_exported as load

    return load(model_dir, use_ema, device)


def __getattr__(name: str) -> Any:
    """`from micro_diffusion import Pipeline` imports the pipeline (torch, the encoders) on first use only."""
    if name == "Pipeline":
        from .eval.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
