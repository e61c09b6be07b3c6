"""Spectral norm on every conv/linear of D, BatchNorm kept or removed, largest singular value near 1."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.spectral import apply_spectral_norm


def tiny_d() -> nn.Module:
    """DCGAN-shaped: conv-act, conv-BN-act, conv-BN-act, a linear head; weights far from SN's scale."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(8, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.2),
                      nn.Sequential(nn.Conv2d(16, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.2)),
                      nn.Flatten(), nn.Linear(16 * 2 * 2, 1))
    with torch.no_grad():
        for m in D.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, 1.0)
    return D


def layers(D, kind):
    return [m for m in D.modules() if isinstance(m, kind)]


def sigma(m: nn.Module) -> float:
    return float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2))


def test_every_conv_and_linear_is_normalised():
    D = tiny_d()
    assert all(sigma(m) > 2.0 for m in layers(D, (nn.Conv2d, nn.Linear)))  # far from 1 before SN
    apply_spectral_norm(D, keep_batchnorm=True)
    convs = layers(D, (nn.Conv2d, nn.Linear))
    assert len(convs) == 4
    for m in convs:
        assert parametrize.is_parametrized(m, "weight")
        assert type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    assert len(layers(D, nn.BatchNorm2d)) == 2
    D.train()
    for _ in range(5):  # power iterations
        D(torch.randn(4, 3, 16, 16))
    D.eval()
    with torch.no_grad():
        for m in convs:
            assert abs(sigma(m) - 1.0) < 0.1


def test_batchnorm_removed_in_place():
    D = apply_spectral_norm(tiny_d(), keep_batchnorm=False)
    assert not layers(D, nn.BatchNorm2d)
    assert isinstance(D[3], nn.Identity) and isinstance(D[5][1], nn.Identity)  # same positions
    assert D(torch.randn(2, 3, 16, 16)).shape == (2, 1)


def test_applying_twice_does_not_stack():
    D = apply_spectral_norm(apply_spectral_norm(tiny_d(), True), True)
    assert all(len(m.parametrizations.weight) == 1 for m in layers(D, (nn.Conv2d, nn.Linear)))
