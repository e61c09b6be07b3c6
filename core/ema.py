"""An exponential moving average of G's weights (G_ema), the copy that is sampled for FID and grids.

G's weights oscillate around what the adversarial game converges to; their running average samples better
(BigGAN at 147k steps: FID 41.8 -> 18.8, BigGAN-PyTorch issue 23). Parameterised as in stylegan2-ada-pytorch
`training/training_loop.py`: a half-life in kimg (`ema_kimg`), so the average forgets at the same rate in
images whatever the batch size, with its optional ramp-up that shortens the half-life early in training:

    ema_nimg = ema_kimg * 1000
    if ema_rampup: ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    p_ema = lerp(p, p_ema, ema_beta)  # parameters averaged; buffers (BatchNorm statistics) copied

Half-life 0 means EMA off: `ema_beta` then returns 0.0 (stylegan's formula at ema_kimg=0: G_ema becomes an
exact copy of G), and the trainer should not build G_ema at all, so the baseline pays nothing and evaluates G.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch: int, nimg: int, half_life_kimg: float, rampup: float = 0.0) -> float:
    """Weight kept by G_ema this step; nimg = images seen before it, rampup 0 = none, half-life 0 -> 0.0 (off)."""
    if half_life_kimg <= 0:
        return 0.0
    ema_nimg = half_life_kimg * 1000
    if rampup > 0:
        ema_nimg = min(ema_nimg, nimg * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


def make_ema(G: nn.Module) -> nn.Module:
    """A frozen copy of G to average into: eval mode, no gradients."""
    return copy.deepcopy(G).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    """G_ema <- beta * G_ema + (1 - beta) * G for parameters (one fused lerp), buffers copied; no host sync."""
    ema_params, params = list(G_ema.parameters()), list(G.parameters())
    ema_buffers, buffers = list(G_ema.buffers()), list(G.buffers())
    if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
        raise ValueError("G_ema and G have different structures; build G_ema with make_ema(G)")
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)
