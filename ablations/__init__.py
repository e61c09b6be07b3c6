"""Ablation plugins: importing this package registers the built-ins (one small module each)."""

from ablations import (baseline, batch_size, label_smoothing, leaky_bn, n_dis, pooling,  # noqa: F401 (register)
                       ttur, weight_decay)
from ablations.registry import Ablation, get_ablation, list_ablations, register_ablation

__all__ = ["Ablation", "get_ablation", "list_ablations", "register_ablation"]
