"""Standing statistics: a copy of G whose BatchNorm statistics are recomputed for G's current weights.

BatchNorm running statistics are an exponential average over past training batches, so they lag behind G's
weights, and sampling in eval mode uses statistics from slightly older Gs. BigGAN (Brock et al. 2019,
BigGAN-PyTorch `utils.accumulate_standing_stats`) and StudioGAN sample with "standing statistics" instead:
reset the running statistics, run G in train mode over a number of fresh z batches with momentum=None
(a cumulative average, every batch weighted equally), then sample in eval mode. Done here on a deep copy,
so the training G, its buffers and its mode are never touched.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def standing_copy(G: nn.Module, z_dim: int, batches: int, batch_size: int, generator: torch.Generator,
                  autocast_ctx: contextlib.AbstractContextManager | None = None) -> nn.Module:
    """A deep copy of G in eval mode with BatchNorm statistics averaged over `batches` fresh z batches."""
    G_standing = copy.deepcopy(G)
    norms = [m for m in G_standing.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if norms:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        device = next(G_standing.parameters()).device
        G_standing.train()
        with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
            for _ in range(batches):
                G_standing(torch.randn(batch_size, z_dim, device=device, generator=generator))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum  # a later train() on the copy behaves like G again
    return G_standing.eval()
