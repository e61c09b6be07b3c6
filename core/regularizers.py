"""The R1 gradient penalty on real images, and stylegan's lazy-regularisation schedule for it.

R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?") penalises the squared norm
of D's input gradient at real images, gamma/2 * E||grad_x D(x)||^2, which makes the game locally convergent.
The penalty needs a double backward, so stylegan2 (Karras et al. 2020) computes it lazily: a separate `Dreg`
phase every `d_reg_interval` = 16 D steps, on the same optimizer as `Dmain`, with the loss multiplied by the
interval so its average strength is unchanged. Because that phase also steps Adam, stylegan scales Adam's lr and
betas by mb_ratio = interval / (interval + 1) (NVlabs/stylegan2-ada-pytorch `training/training_loop.py`:
`opt_kwargs.lr *= mb_ratio; betas = [beta ** mb_ratio ...]`; `training/loss.py`: `r1_penalty =
r1_grads.square().sum([1,2,3]); loss_Dr1 = r1_penalty * (r1_gamma / 2)`, `.mean().mul(gain)` with gain =
the phase interval). With bf16 autocast, D's forward may run in bf16, but the logits are summed, and the
input gradient and its squared norm are taken, in float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from core.errors import UserError


def r1_penalty(D: nn.Module, real: torch.Tensor,
               autocast_ctx: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Mean over the batch of ||grad_x D(x)||^2 at real images, float32, differentiable w.r.t. D's weights."""
    real = real.detach().float().requires_grad_(True)
    with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
        logits = D(real)
    (grad,) = torch.autograd.grad(outputs=logits.float().sum(), inputs=real, create_graph=True)
    return grad.float().square().sum(dim=tuple(range(1, grad.dim()))).mean()


def lazy_reg_scale(gamma: float, interval: int) -> float:
    """Weight of the R1 penalty in a lazy Dreg phase: gamma / 2 * interval (stylegan's gain)."""
    _check(gamma, interval)
    return gamma / 2 * interval


def adam_mb_ratio(interval: int) -> float:
    """interval / (interval + 1): the power for Adam's betas and the factor for its lr under lazy regularisation."""
    _check(0.0, interval)
    return interval / (interval + 1)


def lazy_adam(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple[float, float]]:
    """Adam's lr and betas for an optimizer shared by a main phase and a lazy reg phase every `interval` steps."""
    mb_ratio = adam_mb_ratio(interval)
    return lr * mb_ratio, (betas[0] ** mb_ratio, betas[1] ** mb_ratio)


def _check(gamma: float, interval: int) -> None:
    if gamma < 0:
        raise UserError(f"R1 gamma={gamma} must be >= 0 (0 = off)")
    if interval < 1:
        raise UserError(f"R1 interval={interval} must be >= 1 (1 = every D step)")
