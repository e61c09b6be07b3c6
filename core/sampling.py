"""Which G evaluation samples from (FID/KID and sample grids), and with which BatchNorm statistics.

- `train.ema_kimg > 0`: G_ema, the moving average of G's weights, else G itself (`g_source` = ema | g, a protocol tag).
- `eval.g_mode`: `eval` (running statistics) or `train` (batch statistics) sample that module as it is;
  `standing` samples a copy whose BatchNorm statistics were re-estimated for its current weights over
  `eval.standing_batches` fresh z batches (core/standing.py), made just before each evaluation from a fixed seed,
  so the training G (or G_ema) and its buffers are never touched and two evaluations of the same weights agree.
  G_ema needs this most: its buffers are copied from G, statistics of G's weights, not of the average's.
The statistics are estimated in float32, as FID and grids sample (no autocast).
"""

from __future__ import annotations

import torch
from torch import nn

from core.config import RunConfig
from core.standing import standing_copy

STANDING_SEED = 7  # the z batches that re-estimate BatchNorm statistics: the same at every evaluation


def g_source(cfg: RunConfig) -> str:
    """ema | g: the network evaluation samples from under this config."""
    return "ema" if cfg.train.ema_kimg > 0 else "g"


def evaluated_g(cfg: RunConfig, G: nn.Module, G_ema: nn.Module | None) -> nn.Module:
    """G_ema when on, else G; under eval.g_mode=standing a copy of it with re-estimated BatchNorm statistics."""
    source = G_ema if g_source(cfg) == "ema" else G
    if cfg.eval.g_mode != "standing":
        return source
    device = next(source.parameters()).device
    generator = torch.Generator(device=device).manual_seed(STANDING_SEED)
    return standing_copy(source, cfg.model.z_dim, cfg.eval.standing_batches, cfg.train.batch_size, generator)

