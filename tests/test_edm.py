"""EDM preconditioning, training sigmas and the masked loss."""
import math

import torch

from micro_diffusion.diffusion import edm
from micro_diffusion.models import create_dit


def test_preconditioning_limits():
    tiny_sigma, huge_sigma = torch.tensor(1e-6), torch.tensor(1e6)
    assert math.isclose(edm.c_skip(tiny_sigma).item(), 1.0, abs_tol=1e-9)
    assert edm.c_out(tiny_sigma).item() < 1e-5
    assert edm.c_skip(huge_sigma).item() < 1e-9
    assert math.isclose(edm.c_out(huge_sigma).item(), edm.SIGMA_DATA, rel_tol=1e-6)


def test_preconditioning_gives_unit_variance_input_and_target():
    sigma, sd = torch.tensor([0.1, 1.0, 10.0]), 0.9
    assert torch.allclose(edm.c_in(sigma, sd) ** 2 * (sd**2 + sigma**2), torch.ones(3))
    # the training target (x0 - c_skip x) / c_out has unit variance for data of std sd (EDM eq. 8)
    var = ((1 - edm.c_skip(sigma, sd)) ** 2 * sd**2 + edm.c_skip(sigma, sd) ** 2 * sigma**2) / edm.c_out(sigma, sd) ** 2
    assert torch.allclose(var, torch.ones(3), atol=1e-5)
    assert torch.allclose(edm.loss_weight(sigma, sd), 1 / edm.c_out(sigma, sd) ** 2)


def test_training_sigmas_are_log_normal():
    s = edm.training_sigmas(20000, p_mean=-0.6, p_std=1.2, generator=torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 0.6) < 0.03 and abs(s.log().std().item() - 1.2) < 0.03


def test_masked_loss_ignores_dropped_patches():
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True  # first 12 patches (top three patch rows) dropped
    changed = pred.clone()
    changed[:, :, :6] += 100.0  # rows 0-5 of the latent = patch rows 0-2 with patch size 2
    assert torch.allclose(edm.masked_mse(pred, target, mask, 2), edm.masked_mse(changed, target, mask, 2))
    assert not torch.allclose(edm.masked_mse(pred, target, None, 2), edm.masked_mse(changed, target, None, 2))
    kept_rows = ((pred - target) ** 2)[:, :, 6:].mean(dim=(1, 2, 3))
    assert torch.allclose(edm.masked_mse(pred, target, mask, 2), kept_rows)


def test_edm_loss_is_finite_differentiable_and_seeded():
    torch.manual_seed(0)
    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=16, width=32, depth=2, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=32)
    x0, y = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 16)
    loss = edm.edm_loss(net, x0, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    again = edm.edm_loss(net, x0, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and loss.item() == again.item()
    loss.backward()
    assert net.final.linear.weight.grad.abs().sum() > 0
