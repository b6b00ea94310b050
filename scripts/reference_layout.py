"""Dump the names and shapes of the released MicroDiT's state dict, read from a checkout of the public reference code.

    python scripts/reference_layout.py /path/to/SonyResearch/micro_diffusion [--out tests/data/reference_layout.json]

The reference network is built on the meta device (no weights, no memory) for MicroDiT_Tiny_2 and MicroDiT_XL_2 with
4 and 16 latent channels at the released 512 px size (64x64 latents, pos_interp_scale 2). The JSON it writes is the
fixture tests/test_reference.py converts. `load_reference` is also how the opt-in parity test runs the reference.
Nothing of the reference is copied here: it is imported from the checkout the caller names.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [("MicroDiT_Tiny_2", 4), ("MicroDiT_Tiny_2", 16), ("MicroDiT_XL_2", 4), ("MicroDiT_XL_2", 16)]
LATENT, POS_INTERP, CAPTION_DIM = 64, 2.0, 1024  # the released files: 512 px, DFN5B-CLIP-ViT-H-14 tokens


def load_reference(checkout: str | Path) -> types.ModuleType:
    """The reference's `micro_diffusion/models/dit.py` as a module named `_reference_models.dit` (not ours)."""
    models = Path(checkout) / "micro_diffusion" / "models"
    if not (models / "dit.py").is_file():
        raise FileNotFoundError(f"{models / 'dit.py'} does not exist: not a checkout of SonyResearch/micro_diffusion")
    # its utils.py imports einops.rearrange but never calls it
    if "einops" not in sys.modules and importlib.util.find_spec("einops") is None:
        stub = types.ModuleType("einops")
        stub.rearrange = None
        sys.modules["einops"] = stub
    package = types.ModuleType("_reference_models")
    package.__path__ = [str(models)]
    sys.modules["_reference_models"] = package
    return importlib.import_module("_reference_models.dit")


def layout(ref: types.ModuleType, preset: str, in_channels: int) -> list[list]:
    """[[name, shape], ...] of the reference network's state dict, in its order."""
    with torch.device("meta"):
        net = getattr(ref, preset)(input_size=LATENT, caption_channels=CAPTION_DIM, pos_interp_scale=POS_INTERP,
                                   in_channels=in_channels)
    return [[name, list(t.shape)] for name, t in net.state_dict().items()]


def main(argv: list[str] | None = None) -> int:
    """Write the fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of github.com/SonyResearch/micro_diffusion")
    parser.add_argument("--out", default=str(REPO / "tests" / "data" / "reference_layout.json"))
    args = parser.parse_args(argv)
    ref = load_reference(args.checkout)
    fixture = {"latent_size": LATENT, "pos_interp_scale": POS_INTERP, "caption_dim": CAPTION_DIM,
               "layouts": {f"{preset}/{ch}": layout(ref, preset, ch) for preset, ch in CONFIGS}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    for key, items in fixture["layouts"].items():
        print(f"{key}: {len(items)} tensors")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
