"""G_ema: stylegan's beta, the closed-form exponential average after a few updates, buffers copied, no grads."""

import pytest
import torch
from torch import nn

from core.ema import ema_beta, make_ema, update_ema


def tiny_g() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_ema_beta_is_stylegans():
    assert ema_beta(32, 10**6, 10.0) == pytest.approx(0.5 ** (32 / 10_000))
    # half-life: after half_life_kimg * 1000 images, the old average keeps weight 1/2, whatever the batch
    for batch in (16, 64, 250):
        assert ema_beta(batch, 10**6, 10.0) ** (10_000 / batch) == pytest.approx(0.5)
    # ramp-up: ema_nimg = min(ema_kimg * 1000, cur_nimg * rampup)
    assert ema_beta(32, 1000, 10.0, rampup=0.05) == pytest.approx(0.5 ** (32 / 50))
    assert ema_beta(32, 10**6, 10.0, rampup=0.05) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 0, 10.0, rampup=0.05) == 0.0  # first step: G_ema starts as G (stylegan's 1e-8 guard)
    assert ema_beta(32, 10**6, 0.0) == 0.0  # off


def test_update_matches_closed_form_average():
    G = tiny_g()
    G_ema = make_ema(G)
    start = [p.detach().clone() for p in G_ema.parameters()]
    beta = 0.7
    seq = []
    for t in range(1, 5):  # G's parameters take known values, p_t = start + t * 0.1 * (index + 1)
        with torch.no_grad():
            for i, (p, s) in enumerate(zip(G.parameters(), start)):
                p.copy_(s + t * 0.1 * (i + 1))
        seq.append([p.detach().clone() for p in G.parameters()])
        update_ema(G_ema, G, beta)
    k = len(seq)
    for i, p_ema in enumerate(G_ema.parameters()):
        # ema_k = beta^k ema_0 + sum_t (1 - beta) beta^(k - t) p_t
        want = beta**k * start[i] + sum((1 - beta) * beta ** (k - t) * seq[t - 1][i] for t in range(1, k + 1))
        assert torch.allclose(p_ema, want, atol=1e-6)
        assert not torch.allclose(p_ema, seq[-1][i], atol=1e-3)  # an average, not a copy


def test_buffers_copied_and_no_grads():
    G = tiny_g()
    G_ema = make_ema(G)
    G.train()
    G(torch.randn(16, 4))  # moves BatchNorm running statistics and num_batches_tracked
    update_ema(G_ema, G, 0.99)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        assert torch.equal(b_ema, b)
    assert int(dict(G_ema.named_buffers())["1.num_batches_tracked"]) == 1
    assert not any(p.requires_grad for p in G_ema.parameters()) and not G_ema.training
    loss = G(torch.randn(4, 4)).sum()
    loss.backward()
    assert all(p.grad is None for p in G_ema.parameters())
    assert all(p.grad is not None for p in G.parameters())


def test_beta_zero_copies_and_beta_one_keeps():
    G = tiny_g()
    G_ema = make_ema(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    update_ema(G_ema, G, 1.0)
    assert not any(torch.equal(a, b) for a, b in zip(G_ema.parameters(), G.parameters()))
    update_ema(G_ema, G, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(G_ema.parameters(), G.parameters()))


def test_structure_mismatch_is_refused():
    with pytest.raises(ValueError, match="different structures"):
        update_ema(make_ema(nn.Linear(2, 2)), tiny_g(), 0.5)
