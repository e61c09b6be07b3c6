"""The trainer's extension points, for ablations that cannot be written as config overrides.

Every method does nothing by default and is named for when it runs. Hooks return values instead of
reaching into the trainer. A hook that keeps state implements state_dict/load_state_dict so that a resumed
run continues exactly. None of the built-in ablations needs one: they are all config overrides.
Adding a method here is an API change.
"""

from __future__ import annotations

import torch
from torch import nn


class Hooks:
    def on_models_built(self, G: nn.Module, D: nn.Module) -> tuple[nn.Module, nn.Module]:
        """After G and D are built and initialised, before optimizers exist; may return replacements."""
        return G, D

    def d_targets(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets D's loss receives for real and fake logits (hinge ignores them); default from train.*_label."""
        return real, fake

    def on_eval(self, kimg: float, metrics: dict[str, float]) -> bool:
        """After each FID evaluation; return True to stop training early."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HookList(Hooks):
    """Several hooks applied in order, behaving as one."""

    def __init__(self, hooks: list[Hooks]):
        self.hooks = list(hooks)

    def on_models_built(self, G, D):
        for h in self.hooks:
            G, D = h.on_models_built(G, D)
        return G, D

    def d_targets(self, step, real, fake):
        for h in self.hooks:
            real, fake = h.d_targets(step, real, fake)
        return real, fake

    def on_eval(self, kimg, metrics):
        return any([h.on_eval(kimg, metrics) for h in self.hooks])

    def state_dict(self):
        return {str(i): h.state_dict() for i, h in enumerate(self.hooks)}

    def load_state_dict(self, state):
        for i, h in enumerate(self.hooks):
            h.load_state_dict(state.get(str(i), {}))
