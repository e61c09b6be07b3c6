"""Standing statistics: the copy's BatchNorm buffers are the cumulative average over fresh z batches; G untouched."""

import torch
from torch import nn

from core.standing import standing_copy

Z_DIM = 4


class TinyG(nn.Module):
    def __init__(self, norm: bool = True):
        super().__init__()
        self.stem = nn.Linear(Z_DIM, 4 * 4 * 4)
        self.bn = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.to_rgb = nn.Conv2d(4, 3, 3, 1, 1)

    def forward(self, z):
        return torch.tanh(self.to_rgb(torch.relu(self.bn(self.stem(z).view(-1, 4, 4, 4)))))


def trained_g(norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    G = TinyG(norm)
    G.train()
    for _ in range(3):  # some running statistics of its own
        G(torch.randn(8, Z_DIM) * 3 + 1)
    return G


def test_copy_recomputes_statistics_and_leaves_g_alone():
    G = trained_g()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    S = standing_copy(G, Z_DIM, batches=5, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert S is not G and not S.training and G.training  # G's mode untouched too
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical
    assert not torch.allclose(S.bn.running_mean, G.bn.running_mean)
    assert not torch.allclose(S.bn.running_var, G.bn.running_var)
    assert int(S.bn.num_batches_tracked) == 5
    assert S.bn.momentum == G.bn.momentum  # restored on the copy


def test_running_stats_are_the_cumulative_average_of_batch_stats():
    G = trained_g()
    gen = torch.Generator().manual_seed(7)
    S = standing_copy(G, Z_DIM, batches=4, batch_size=16, generator=gen)
    # replay the same z batches and read BatchNorm's input directly
    replay = torch.Generator().manual_seed(7)
    means, variances = [], []
    with torch.no_grad():
        for _ in range(4):
            h = G.stem(torch.randn(16, Z_DIM, generator=replay)).view(-1, 4, 4, 4)
            means.append(h.mean(dim=(0, 2, 3)))
            variances.append(h.var(dim=(0, 2, 3), unbiased=True))
    assert torch.allclose(S.bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(S.bn.running_var, torch.stack(variances).mean(0), atol=1e-5)
    assert not torch.allclose(S.bn.running_mean, means[-1], atol=1e-3)  # every batch counts, not just the last


def test_g_without_batchnorm_gives_an_equivalent_copy():
    G = trained_g(norm=False)
    S = standing_copy(G, Z_DIM, batches=3, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert S is not G and not S.training
    z = torch.randn(5, Z_DIM)
    assert torch.equal(S(z), G(z))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(S.parameters(), G.parameters()))
