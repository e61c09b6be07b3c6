"""Ablation plugins: importing this package registers the built-ins (one small module each)."""

from ablations import (augment, baseline, batch_size, combine, cspup, ema, label_smoothing, leaky_bn,  # noqa: F401
                       loss, n_dis, pooling, r1, spectral_norm, ttur, weight_decay)
from ablations.registry import Ablation, get_ablation, list_ablations, register_ablation

__all__ = ["Ablation", "get_ablation", "list_ablations", "register_ablation"]
