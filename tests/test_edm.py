"""EDM preconditioning, training sigmas and the masked loss."""
import math

import torch

from micro_diffusion.diffusion import edm
from micro_diffusion.models import create_dit
from micro_diffusion.models.patches import keep_pixels


def test_preconditioning_limits():
    tiny_sigma, huge_sigma = torch.tensor(1e-6), torch.tensor(1e6)
    assert math.isclose(edm.c_skip(tiny_sigma, edm.SIGMA_DATA).item(), 1.0, abs_tol=1e-9)
    assert edm.c_out(tiny_sigma, edm.SIGMA_DATA).item() < 1e-5
    assert edm.c_skip(huge_sigma, edm.SIGMA_DATA).item() < 1e-9
    assert math.isclose(edm.c_out(huge_sigma, edm.SIGMA_DATA).item(), edm.SIGMA_DATA, rel_tol=1e-6)


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
    keep = keep_pixels(mask, (4, 4), 2)
    assert keep.shape == (2, 1, 8, 8) and keep[:, :, :6].sum() == 0 and bool((keep[:, :, 6:] == 1).all())
    changed = pred.clone()
    changed[:, :, :6] += 100.0  # rows 0-5 of the latent = patch rows 0-2 with patch size 2
    assert torch.allclose(edm.masked_mse(pred, target, keep), edm.masked_mse(changed, target, keep))
    assert not torch.allclose(edm.masked_mse(pred, target, None), edm.masked_mse(changed, target, None))
    kept_rows = ((pred - target) ** 2)[:, :, 6:].mean(dim=(1, 2, 3))
    assert torch.allclose(edm.masked_mse(pred, target, keep), kept_rows)


def tiny_net():
    torch.manual_seed(0)
    return create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=16, width=32, depth=2, head_dim=16,
                      patch_mixer_depth=1, patch_mixer_width=32)


def test_network_keep_weights_cover_exactly_the_kept_patches():
    net = tiny_net()
    out = net(torch.randn(3, 4, 8, 8), torch.zeros(3), torch.randn(3, 5, 16), mask_ratio=0.75,
              generator=torch.Generator().manual_seed(2))
    for n in range(3):
        for t in range(16):  # row-major over the 4x4 patch grid, 2x2 pixels each
            r, c = divmod(t, 4)
            assert bool((out.keep[n, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] == float(not out.mask[n, t])).all())
    plain = net(torch.randn(3, 4, 8, 8), torch.zeros(3), torch.randn(3, 5, 16))
    assert plain.mask is None and plain.keep is None


def test_denoiser_is_the_preconditioned_network_and_passes_network_options_through():
    net, sd = tiny_net(), 0.7
    for p in net.parameters():  # zero-init output layers give D = c_skip x; perturb so F matters
        p.data.add_(0.05 * torch.randn_like(p))
    x, y, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([0.3, 4.0])
    d = edm.EDMPrecond(net, sigma_data=sd)
    f = net(edm.c_in(sigma, sd).reshape(-1, 1, 1, 1) * x, edm.c_noise(sigma), y).sample
    expected = edm.c_skip(sigma, sd).reshape(-1, 1, 1, 1) * x + edm.c_out(sigma, sd).reshape(-1, 1, 1, 1) * f
    assert torch.allclose(d(x, sigma, y), expected, atol=1e-6)
    masked = d.denoise(x, sigma, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))[1]
    again = d.denoise(x, sigma, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))[1]
    assert masked is not None and torch.equal(masked, again) and masked.mean().item() == 0.5


def test_edm_loss_is_finite_differentiable_and_seeded():
    net = tiny_net()
    d = edm.EDMPrecond(net, edm.SIGMA_DATA)
    x0, y = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 16)

    def loss(noise_seed: int, patch_seed: int) -> torch.Tensor:
        return d.loss(x0, y, -0.6, 1.2, torch.Generator().manual_seed(noise_seed), mask_ratio=0.75,
                      generator=torch.Generator().manual_seed(patch_seed))

    first = loss(1, 2)
    assert torch.isfinite(first) and first.item() == loss(1, 2).item()
    assert loss(1, 3).item() != first.item() and loss(4, 2).item() != first.item()  # two independent draws
    first.backward()
    assert net.final.linear.weight.grad.abs().sum() > 0
