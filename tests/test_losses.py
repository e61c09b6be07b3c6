"""Each GAN loss equals its formula written out on known logits, and the D-loss floor is what the targets allow."""

import math

import pytest
import torch
import torch.nn.functional as F

from core import losses
from core.errors import UserError

R = torch.tensor([2.0, -0.5, 0.3, 1.5])  # logits D gave real images
FK = torch.tensor([-1.0, 0.8, -2.5, 0.1])  # and generated ones


def bce(logits, t):  # -[t log s + (1 - t) log(1 - s)], written out
    s = torch.sigmoid(logits)
    return -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()


def logit(p: float) -> float:
    return math.log(p / (1 - p)) if p > 0 else -40.0


def test_bce_matches_formula_and_todays_trainer():
    got = losses.d_loss("bce", R, FK, 0.9, 0.0)
    assert torch.allclose(got, bce(R, 0.9) + bce(FK, 0.0), atol=1e-6)
    t_real, t_fake = torch.full_like(R, 0.9), torch.zeros_like(FK)  # what core/trainer.py passes today
    trainer = F.binary_cross_entropy_with_logits(R, t_real) + F.binary_cross_entropy_with_logits(FK, t_fake)
    assert torch.allclose(losses.d_loss("bce", R, FK, t_real, t_fake), trainer, atol=1e-7)
    assert torch.allclose(losses.g_loss("bce", FK), -torch.log(torch.sigmoid(FK)).mean(), atol=1e-6)


def test_hinge_matches_formula():
    want = sum(max(0.0, 1 - r) for r in R.tolist()) / 4 + sum(max(0.0, 1 + f) for f in FK.tolist()) / 4
    assert losses.d_loss("hinge", R, FK, 1.0, 0.0).item() == pytest.approx(want, abs=1e-6)
    assert losses.g_loss("hinge", FK).item() == pytest.approx(-sum(FK.tolist()) / 4, abs=1e-6)


def test_lsgan_matches_formula_with_labels_as_targets():
    for b, a in [(1.0, 0.0), (0.9, 0.1)]:
        want = (0.5 * sum((r - b) ** 2 for r in R.tolist()) / 4 + 0.5 * sum((f - a) ** 2 for f in FK.tolist()) / 4)
        assert losses.d_loss("lsgan", R, FK, b, a).item() == pytest.approx(want, abs=1e-6)
    want_g = 0.5 * sum((f - 1) ** 2 for f in FK.tolist()) / 4
    assert losses.g_loss("lsgan", FK).item() == pytest.approx(want_g, abs=1e-6)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_bf16_logits_give_float32_losses(kind):
    d = losses.d_loss(kind, R.bfloat16(), FK.bfloat16(), torch.ones(4, dtype=torch.bfloat16), 0.0)
    g = losses.g_loss(kind, FK.bfloat16())
    assert d.dtype == torch.float32 and g.dtype == torch.float32
    assert d.item() == pytest.approx(losses.d_loss(kind, R.bfloat16().float(), FK.bfloat16().float(), 1.0, 0.0).item())


def test_min_d_loss_values():
    assert losses.min_d_loss("bce", 1.0, 0.0) == 0.0
    assert losses.min_d_loss("bce", 0.9, 0.0) == pytest.approx(0.325083, abs=1e-6)
    assert losses.min_d_loss("bce", 0.9, 0.1) == pytest.approx(2 * 0.325083, abs=1e-6)
    assert losses.min_d_loss("hinge", 1.0, 0.0) == 0.0
    assert losses.min_d_loss("lsgan", 0.9, 0.0) == 0.0


@pytest.mark.parametrize("kind,real,fake",
                         [("bce", 0.9, 0.0), ("bce", 0.8, 0.3), ("lsgan", 0.9, 0.1), ("hinge", 1.0, 0.0)])
def test_min_d_loss_is_reached_by_the_best_d(kind, real, fake):
    if kind == "bce":  # sigmoid(logit) = target (fake 0: a logit far enough down)
        r, f = torch.full((4,), logit(real)), torch.full((4,), logit(fake))
    elif kind == "lsgan":  # logit = target
        r, f = torch.full((4,), real), torch.full((4,), fake)
    else:  # margins met
        r, f = torch.full((4,), 1.5), torch.full((4,), -1.5)
    assert losses.d_loss(kind, r, f, real, fake).item() == pytest.approx(losses.min_d_loss(kind, real, fake), abs=1e-5)
    worse = losses.d_loss(kind, r - 3.0, f + 3.0, real, fake).item()  # a D that errs on both sides
    assert worse > losses.min_d_loss(kind, real, fake) + 0.1


def test_check_loss_labels():
    losses.check_loss_labels("hinge", 1.0, 0.0)
    losses.check_loss_labels("lsgan", 0.9, 0.1)
    losses.check_loss_labels("bce", 0.9, 0.0)
    with pytest.raises(UserError, match="hinge.*smoothing"):
        losses.check_loss_labels("hinge", 0.9, 0.0)
    with pytest.raises(UserError, match="hinge"):
        losses.check_loss_labels("hinge", 1.0, 0.1)
    with pytest.raises(UserError, match="bce, hinge, lsgan"):
        losses.check_loss_labels("wgan", 1.0, 0.0)
    with pytest.raises(UserError, match="bce, hinge, lsgan"):
        losses.d_loss("wgan", R, FK, 1.0, 0.0)
