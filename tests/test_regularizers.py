"""R1 equals a direct per-image autograd computation, stays close under bf16 autocast; stylegan's lazy scaling."""

import pytest
import torch
from torch import nn

from core.errors import UserError
from core.regularizers import adam_mb_ratio, lazy_adam, lazy_reg_scale, r1_penalty


def tiny_d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(8, 1, 2), nn.Flatten(0))


def direct_r1(D: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """One image at a time: ||d D(x_i) / d x_i||^2, averaged."""
    norms = []
    for x in real:
        x = x[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(D(x).sum(), x)
        norms.append((g**2).sum())
    return torch.stack(norms).mean()


def test_r1_equals_direct_autograd():
    D = tiny_d()
    real = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = r1_penalty(D, real)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.allclose(got, direct_r1(D, real), rtol=1e-5)
    assert not real.requires_grad  # the caller's batch is left alone
    got.backward()  # create_graph: the penalty trains D's weights (biases only through ReLU's kinks, so not checked)
    weights = [m.weight for m in D if isinstance(m, nn.Conv2d)]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


def test_r1_under_bf16_autocast_is_finite_and_close():
    D = tiny_d()
    real = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = direct_r1(D, real)
    got = r1_penalty(D, real, torch.autocast("cpu", dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert torch.allclose(got, want, rtol=0.02)  # bf16 keeps 8 mantissa bits; observed ~0.1% here
    assert got != r1_penalty(D, real)  # and D really ran in bf16
    got.backward()
    assert all(torch.isfinite(m.weight.grad).all() for m in D if isinstance(m, nn.Conv2d))


def test_lazy_scaling_is_stylegans():
    assert lazy_reg_scale(10.0, 16) == 80.0  # gamma / 2 * interval
    assert lazy_reg_scale(0.1, 16) == pytest.approx(0.8)
    assert lazy_reg_scale(10.0, 1) == 5.0  # not lazy: stylegan's gamma / 2
    assert adam_mb_ratio(16) == pytest.approx(16 / 17)
    lr, (b1, b2) = lazy_adam(0.0025, (0.0, 0.99), 16)  # stylegan2's D optimizer
    assert lr == pytest.approx(0.0025 * 16 / 17) and b1 == 0.0 and b2 == pytest.approx(0.99 ** (16 / 17))
    lr, (b1, b2) = lazy_adam(2e-4, (0.5, 0.999), 16)  # our DCGAN defaults
    assert lr == pytest.approx(1.882353e-4) and b1 == pytest.approx(0.520808, abs=1e-6)
    assert b2 == pytest.approx(0.9990588, abs=1e-7)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="interval"):
        adam_mb_ratio(0)
    with pytest.raises(UserError, match="gamma"):
        lazy_reg_scale(-1.0, 16)
