"""Ablation plugins: importing this package registers the built-ins (one small module each)."""

from ablations import pooling  # noqa: F401  (registers on import)
from ablations.registry import Ablation, get_ablation, list_ablations, register_ablation

__all__ = ["Ablation", "get_ablation", "list_ablations", "register_ablation"]
