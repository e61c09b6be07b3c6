"""GAN losses as pure functions of D's logits, so the trainer can swap the objective by name (`train.loss`).

Three objectives the field settled on, all computed in float32 even when the logits come out of bf16 autocast:
- `bce`: the non-saturating loss of Goodfellow et al. 2014, exactly what core/trainer.py `_d_step`/`_g_step`
  compute today (D: BCE-with-logits of real vs t_real plus fake vs t_fake, each a mean; G: BCE of fake vs 1).
- `hinge`: Lim & Ye 2017, "Geometric GAN", used by SNGAN (Miyato et al. 2018) and BigGAN.
  D: mean(relu(1 - r)) + mean(relu(1 + f)); G: -mean(f).
- `lsgan`: Mao et al. 2017, "Least Squares GAN", with their a=0, b=1, c=1 coding.
  D: 0.5 mean((r - b)^2) + 0.5 mean((f - a)^2); G: 0.5 mean((f - c)^2).

What the label settings (train.real_label / train.fake_label, and the targets hooks.d_targets hands D) mean:
- `bce`: the BCE targets, so one-sided smoothing (real 0.9) keeps its usual meaning.
- `lsgan`: the targets b (real) and a (fake) of the least-squares regression: Mao et al.'s a/b ARE labels, so
  smoothing carries over naturally (b=0.9 asks D to regress reals onto 0.9). G's target c stays 1, as G's
  BCE target stays 1 under smoothing.
- `hinge`: has no targets, only the margins +-1; a smoothed label has no meaning there, so
  `core.config.check_loss_labels` refuses anything but real 1 / fake 0 (and `d_loss` ignores t_real / t_fake).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.config import LOSSES, check_loss_labels  # noqa: F401  (re-exported: the label rules sit with the config)
from core.errors import UserError

LSGAN_C = 1.0  # G's least-squares target for fake logits (Mao et al.'s c)

Target = torch.Tensor | float


def d_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor,
           t_real: Target, t_fake: Target) -> torch.Tensor:
    """D's loss on real and fake logits against targets t_real / t_fake (ignored by hinge), in float32."""
    r, f = logits_real.float(), logits_fake.float()
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(r, _like(t_real, r))
                + F.binary_cross_entropy_with_logits(f, _like(t_fake, f)))
    if kind == "hinge":
        return F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()
    if kind == "lsgan":
        return 0.5 * (r - _like(t_real, r)).square().mean() + 0.5 * (f - _like(t_fake, f)).square().mean()
    raise UserError(f"loss '{kind}' is not one of: {', '.join(LOSSES)}")


def g_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """G's loss on D's logits for its samples, in float32 (non-saturating for bce)."""
    f = logits_fake.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(f, torch.ones_like(f))
    if kind == "hinge":
        return -f.mean()
    if kind == "lsgan":
        return 0.5 * (f - LSGAN_C).square().mean()
    raise UserError(f"loss '{kind}' is not one of: {', '.join(LOSSES)}")


def min_d_loss(kind: str, real_label: float, fake_label: float) -> float:
    """The lowest D loss these targets allow, the floor that saturation detection should measure from."""
    if kind == "bce":  # D's best is sigmoid(logit) = target, leaving each target's binary entropy
        return _binary_entropy(real_label) + _binary_entropy(fake_label)
    if kind in ("hinge", "lsgan"):  # margins met / targets hit exactly
        return 0.0
    raise UserError(f"loss '{kind}' is not one of: {', '.join(LOSSES)}")


def _binary_entropy(p: float) -> float:
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0.0)


def _like(target: Target, logits: torch.Tensor) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        return target.float().expand_as(logits)
    return torch.full_like(logits, float(target))
