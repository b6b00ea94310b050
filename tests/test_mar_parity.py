"""Opt-in: our DiffusionHead against MAR's SimpleMLPAdaLN from a checkout of LTH14/mar (set MAR_REPO to its root).

MAR's code is never part of this project: the test imports models/diffloss.py from the given checkout (it needs torch
and numpy; its `diffusion` package comes from the same checkout), loads MAR's weights into our head with strict=True
and compares the outputs.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from micro_diffusion.models.fluid import DiffusionHead

MAR_REPO = os.environ.get("MAR_REPO")
pytestmark = pytest.mark.skipif(not MAR_REPO, reason="set MAR_REPO to a checkout of LTH14/mar")


@pytest.fixture(scope="module")
def diffloss():
    """MAR's models/diffloss.py as a module of its own name, its imports resolved inside the checkout."""
    path = Path(MAR_REPO) / "models" / "diffloss.py"
    if not path.is_file():
        pytest.fail(f"MAR_REPO={MAR_REPO} has no models/diffloss.py")
    sys.path.insert(0, MAR_REPO)  # diffloss.py imports MAR's top-level `diffusion` package
    try:
        spec = importlib.util.spec_from_file_location("mar_diffloss", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(MAR_REPO)
    return module


@pytest.mark.parametrize("d, cond, width, depth", [(16, 1024, 1024, 3), (16, 768, 1024, 6), (12, 40, 24, 2)])
def test_mar_weights_load_strictly_and_agree(diffloss, d, cond, width, depth):
    torch.manual_seed(0)
    mar = diffloss.SimpleMLPAdaLN(in_channels=d, model_channels=width, out_channels=2 * d, z_channels=cond,
                                  num_res_blocks=depth).eval()
    with torch.no_grad():
        for p in mar.parameters():  # non-zero everywhere, so the zero-initialised layers are compared too
            p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
    ours = DiffusionHead(token_dim=d, cond_dim=cond, width=width, depth=depth).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in mar.state_dict().items()}
    ours.load_state_dict(mar.state_dict(), strict=True)
    x, t, c = torch.randn(64, d), torch.randint(0, 1000, (64,)), torch.randn(64, cond)
    with torch.no_grad():
        expected, got = mar(x, t, c), ours(x, t, c)
    assert got.shape == (64, 2 * d) and expected.abs().mean() > 1e-2  # a live output, not the zero init
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fresh_heads_agree(diffloss):
    """Both inits give the same zero output, and the same init statistics where they are random."""
    torch.manual_seed(0)
    mar = diffloss.SimpleMLPAdaLN(16, 256, 32, 64, 2)
    ours = DiffusionHead(16, 64, 256, 2)
    x, t, c = torch.randn(8, 16), torch.randint(0, 1000, (8,)), torch.randn(8, 64)
    assert torch.equal(mar(x, t, c), ours(x, t, c))
    for (name, a), b in zip(mar.state_dict().items(), ours.state_dict().values(), strict=True):
        assert (torch.count_nonzero(a) == 0) == (torch.count_nonzero(b) == 0), name  # the same tensors start at zero
        if a.ndim == 2 and torch.count_nonzero(a):
            assert abs(a.std().item() / b.std().item() - 1) < 0.1, name
