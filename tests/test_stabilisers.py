"""The stabilisers inside the trainer's loop: G_ema, standing statistics, spectral norm, hinge/LS losses, lazy R1,
x-flip and DiffAugment, each checked where the trainer uses it (the building blocks have unit tests of their own)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import core.augment as augment_mod
import core.regularizers as regularizers_mod
from tests.helpers import build
from core.errors import UserError
from core.metrics import MetricResult, Score
from core.sampling import STANDING_SEED
from core.standing import standing_copy


def recording_d(trainer, inputs: list, logits: list) -> None:
    """Wrap the D the step calls, keeping its inputs and float logits."""
    D = trainer.D_train

    def record(x):
        out = D(x)
        inputs.append(x)
        logits.append(out.detach().float())
        return out
    trainer.D_train = record


# ---- G_ema ---------------------------------------------------------------------------------------------

def test_g_ema_is_the_closed_form_average_of_g_over_the_steps(tiny_cfg):
    trainer = build(tiny_cfg(train__ema_kimg=0.02), with_fid=False)  # half-life 20 images, batch 8
    beta = 0.5 ** (8 / 20)
    start = [p.detach().clone() for p in trainer.G.parameters()]  # G_ema starts as a copy of G
    seen = []
    for _ in range(4):
        trainer.train_step()
        seen.append([p.detach().clone() for p in trainer.G.parameters()])
    k = len(seen)
    for i, p_ema in enumerate(trainer.G_ema.parameters()):
        # ema_k = beta^k p_0 + sum_t (1 - beta) beta^(k - t) p_t
        want = beta**k * start[i] + sum((1 - beta) * beta ** (k - t) * seen[t - 1][i] for t in range(1, k + 1))
        torch.testing.assert_close(p_ema, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(trainer.G_ema.parameters(), seen[-1]))
    assert all(torch.equal(a, b) for a, b in zip(trainer.G_ema.buffers(), trainer.G.buffers()))  # copied from G
    assert not trainer.G_ema.training and not any(p.requires_grad for p in trainer.G_ema.parameters())


def test_g_ema_is_off_by_default_and_evaluated_when_on(tiny_cfg):
    assert build(tiny_cfg(), with_fid=False).G_ema is None
    trainer = build(tiny_cfg(train__ema_kimg=0.02), with_fid=False)
    trainer.train_step()
    handed = []
    trainer.evaluate = lambda G, n: (handed.append(G), MetricResult((Score("fid", "fid16", 1.0),), {}, {}, num_samples=n))[1]
    trainer._eval_fid(16)
    assert handed == [trainer.G_ema]
    z = torch.randn(4, 128, generator=torch.Generator().manual_seed(2024))
    with torch.no_grad():
        want = ((trainer.G_ema(z).float() + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(trainer.sample_grid(), want, rtol=0, atol=0)  # grids sample G_ema too


@pytest.mark.parametrize("overrides", [
    {"train.ema_kimg": 0.02},
    {"train.ema_kimg": 0.02, "train.ema_rampup": 0.5, "train.augment": "diffaug", "train.r1_gamma": 1.0,
     "train.r1_interval": 2, "train.loss": "hinge", "model.d_spectral_norm": True},
    {"train.augment": "xflip", "train.loss": "lsgan", "model.d_spectral_norm": True, "model.d_sn_keep_bn": False},
], ids=["ema", "ema+diffaug+r1+hinge+sn", "xflip+lsgan+sn_no_bn"])
def test_resume_mid_run_ends_bitwise_identical(tiny_cfg, tmp_path, overrides):
    cfg = tiny_cfg(train__kimg=0.048, **{k.replace(".", "__"): v for k, v in overrides.items()})
    straight = build(cfg, with_fid=False, run_dir=tmp_path / "a")
    straight.run()
    first = build(cfg, with_fid=False, run_dir=tmp_path / "b")
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    second = build(cfg, with_fid=False, run_dir=tmp_path / "b")
    assert second.try_resume() and second.step == 3
    second.run()
    nets = ["G", "D"] + (["G_ema"] if straight.G_ema is not None else [])
    for net in nets:
        for (k, a), b in zip(getattr(straight, net).state_dict().items(), getattr(second, net).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{net}.{k}")
    assert second.phase_steps == straight.phase_steps


# ---- standing statistics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ema", [False, True])
def test_standing_statistics_change_the_evaluated_copy_only(tiny_cfg, ema):
    cfg = tiny_cfg(eval__g_mode="standing", eval__standing_batches=4, train__ema_kimg=0.02 if ema else 0.0)
    trainer = build(cfg, with_fid=False)
    for _ in range(3):
        trainer.train_step()
    source = trainer.G_ema if ema else trainer.G
    before = {k: v.clone() for k, v in source.state_dict().items()}
    mode = source.training
    handed = []
    trainer.evaluate = lambda G, n: (handed.append(G), MetricResult((Score("fid", "fid16", 1.0),), {}, {}, num_samples=n))[1]
    trainer._eval_fid(16)  # the trainer's evaluation path
    (evaluated,) = handed
    assert evaluated is not source and not evaluated.training
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(evaluated.state_dict()[k], before[k]) for k in stats)
    weights = [k for k, _ in source.named_parameters()]
    assert all(torch.equal(evaluated.state_dict()[k], before[k]) for k in weights)  # same weights, new statistics
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items()) and source.training == mode
    # exactly the statistics of standing_batches fresh z batches from the fixed seed
    want = standing_copy(source, 128, 4, 8, torch.Generator().manual_seed(STANDING_SEED))
    for k in stats:
        torch.testing.assert_close(evaluated.state_dict()[k], want.state_dict()[k], rtol=0, atol=0)


def test_standing_grids_leave_the_training_g_alone(tiny_cfg):
    trainer = build(tiny_cfg(eval__g_mode="standing", eval__standing_batches=2), with_fid=False)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.G.state_dict().items()}
    grid = trainer.sample_grid()
    assert grid.shape == (4, 3, 32, 32) and trainer.G.training
    assert all(torch.equal(v, before[k]) for k, v in trainer.G.state_dict().items())


def test_fid_protocol_names_the_evaluated_g(tiny_cfg):
    trainer = build(tiny_cfg(train__ema_kimg=0.02, eval__g_mode="standing", eval__standing_batches=2))
    fid, _ = trainer._eval_fid(16)
    assert fid.protocol["g_source"] == "ema" and fid.protocol["g_mode"] == "standing"
    assert fid.protocol["standing_batches"] == 2


# ---- spectral norm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_bn", [True, False])
def test_spectral_norm_on_every_d_conv_and_sigma_near_one(tiny_cfg, keep_bn):
    trainer = build(tiny_cfg(model__d_spectral_norm=True, model__d_sn_keep_bn=keep_bn), with_fid=False)
    convs = [m for m in trainer.D.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert not any(parametrize.is_parametrized(m) for m in trainer.G.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainer.D.modules()) == keep_bn
    # the optimizer holds the unnormalised weights SN divides
    held = {id(p) for g in trainer.opt_d.param_groups for p in g["params"]}
    assert all(id(m.parametrizations.weight.original) in held for m in convs)
    for _ in range(4):
        trainer.train_step()  # one power iteration per D forward, under the trainer's autocast
    trainer.D.eval()  # read sigma without another power iteration
    with torch.no_grad():
        sigmas = [float(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)) for m in convs]
    assert all(abs(s - 1) < 0.05 for s in sigmas), sigmas


# ---- losses ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,real_label", [("bce", 1.0), ("hinge", 1.0), ("lsgan", 1.0), ("lsgan", 0.9)])
def test_losses_in_the_step_equal_their_formulas(tiny_cfg, kind, real_label):
    trainer = build(tiny_cfg(train__loss=kind, train__real_label=real_label), with_fid=False)
    inputs, logits = [], []
    recording_d(trainer, inputs, logits)
    trainer.train_step()
    r, f, g = logits  # D step: real, fake; G step: fake
    want_d, want_g = {
        "bce": (F.softplus(-r).mean() * real_label + F.softplus(r).mean() * (1 - real_label) + F.softplus(f).mean(),
                F.softplus(-g).mean()),
        "hinge": (F.relu(1 - r).mean() + F.relu(1 + f).mean(), -g.mean()),
        "lsgan": (0.5 * (r - real_label).square().mean() + 0.5 * f.square().mean(), 0.5 * (g - 1).square().mean()),
    }[kind]
    stats = trainer.read_stats()
    assert stats["loss/d"] == pytest.approx(float(want_d), rel=1e-5)
    assert stats["loss/g"] == pytest.approx(float(want_g), rel=1e-5)


# ---- R1 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_dis,d_interval,want", [(1, 1, [16, 32]), (2, 1, [16, 32, 48, 64, 80]), (1, 2, [16])])
def test_r1_runs_after_every_16th_d_step(tiny_cfg, monkeypatch, n_dis, d_interval, want):
    trainer = build(tiny_cfg(train__r1_gamma=10.0, train__n_dis=n_dis, train__d_interval=d_interval,
                                 train__kimg=0.32), with_fid=False)
    at = []
    real_r1 = regularizers_mod.r1_penalty
    monkeypatch.setattr(regularizers_mod, "r1_penalty", lambda *a: (at.append(trainer.d_steps), real_r1(*a))[1])
    for _ in range(40):
        trainer.train_step()
    assert at == want and trainer.phase_steps["Dreg"] == len(want)
    assert trainer.read_stats()["loss/r1"] > 0


def test_r1_step_is_the_penalty_scaled_as_stylegan(tiny_cfg, monkeypatch):
    trainer = build(tiny_cfg(train__r1_gamma=10.0, train__amp="fp32"), with_fid=False)  # bf16: 0.5% noise
    # Adam shared by D and the lazy Dreg phase: lr and betas scaled by interval / (interval + 1) = 16/17
    group = trainer.opt_d.param_groups[0]
    assert group["lr"] == pytest.approx(2e-4 * 16 / 17)
    assert group["betas"] == pytest.approx((0.5 ** (16 / 17), 0.999 ** (16 / 17)))
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(2e-4)
    params = list(trainer.D.parameters())
    direct, grads = [], []
    real_r1 = regularizers_mod.r1_penalty

    def spy(D, real, autocast_ctx=None):
        penalty = real_r1(D, real, autocast_ctx)
        got = torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True)
        direct.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, got)])
        return penalty

    monkeypatch.setattr(regularizers_mod, "r1_penalty", spy)
    step = trainer.opt_d.step
    trainer.opt_d.step = lambda *a, **k: (grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                        for p in params]), step(*a, **k))[1]
    for _ in range(16):
        trainer.train_step()
    assert len(grads) == 17 and len(direct) == 1  # 16 D steps, then one Dreg step
    for got, want in zip(grads[-1], direct[0]):
        torch.testing.assert_close(got, 10.0 / 2 * 16 * want, rtol=1e-4, atol=5e-3)  # conv biases before BN: ~0


# ---- augmentation ----------------------------------------------------------------------------------------

def test_diffaugment_is_applied_to_real_and_generated_batches(tiny_cfg, monkeypatch):
    trainer = build(tiny_cfg(train__augment="diffaug"), with_fid=False)
    drawn, generated, augmented, d_inputs, logits = [], [], [], [], []
    draw, G = trainer.batches.next, trainer.G_train
    trainer.batches.next = lambda n: (drawn.append(draw(n)), drawn[-1])[1]
    trainer.G_train = lambda z: (generated.append(G(z)), generated[-1])[1]
    real_aug = augment_mod.diff_augment
    monkeypatch.setattr(augment_mod, "diff_augment",
                        lambda x, gen: (augmented.append((x, real_aug(x, gen))), augmented[-1][1])[1])
    recording_d(trainer, d_inputs, logits)
    trainer.train_step()
    (real_in, real_out), (fake_in, fake_out), (g_in, g_out) = augmented  # D step: real, fake; G step: fake
    assert real_in is drawn[0] and fake_in is generated[0] and g_in is generated[1]
    assert all(a is b for a, b in zip(d_inputs, [real_out, fake_out, g_out], strict=True))  # D sees the augmented
    assert not torch.equal(real_out, real_in) and not torch.equal(fake_out, fake_in.to(fake_out.dtype))
    assert g_out.requires_grad  # the G step's gradient reaches G through the augmentation
    assert all(p.grad is not None for p in trainer.G.parameters())


def test_xflip_flips_about_half_of_the_real_images(tiny_cfg, monkeypatch):
    trainer = build(tiny_cfg(train__augment="xflip", train__kimg=0.32), with_fid=False)
    pairs, d_inputs, logits = [], [], []
    real_flip = augment_mod.xflip
    monkeypatch.setattr(augment_mod, "xflip", lambda x, gen: (pairs.append((x, real_flip(x, gen))), pairs[-1][1])[1])
    recording_d(trainer, d_inputs, logits)
    for _ in range(40):
        trainer.train_step()
    assert len(pairs) == 40  # every real batch, and only real batches (one per D step)
    assert all(d_inputs[3 * i] is out for i, (_, out) in enumerate(pairs))  # D sees the flipped batch
    flipped = kept = 0
    for x, out in pairs:
        for a, b in zip(x, out):
            flipped += torch.equal(b, a.flip(2)) and not torch.equal(b, a)
            kept += torch.equal(b, a)
    assert flipped + kept == 40 * 8
    assert 0.4 < flipped / (40 * 8) < 0.6


# ---- configuration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"train.loss": "wgan"}, "train.loss='wgan' is not one of: bce, hinge, lsgan"),
    ({"train.loss": "hinge", "train.fake_label": 0.1}, "hinge has margins, not targets"),
    ({"train.r1_gamma": -1.0}, "train.r1_gamma=-1.0 must be >= 0"),
    ({"train.r1_interval": 0}, "train.r1_interval=0 must be >= 1"),
    ({"train.augment": "cutout"}, "train.augment='cutout' is not one of: none, xflip, diffaug"),
    ({"train.ema_kimg": -1.0}, "train.ema_kimg and train.ema_rampup must be >= 0"),
    ({"train.ema_rampup": 0.05}, "train.ema_rampup needs train.ema_kimg > 0"),
    ({"eval.g_mode": "standing", "eval.standing_batches": 0}, "eval.standing_batches=0 must be >= 1"),
    ({"eval.g_mode": "frozen"}, "eval.g_mode='frozen' is not one of: eval, train, standing"),
    ({"model.d_sn_keep_bn": False}, "d_sn_keep_bn=false only applies with model.d_spectral_norm=true"),
    ({"model.d_spectral_norm": True, "model.d_sn_keep_bn": False, "model.d_norm": "after_act"}, "removes D's BatchNorm"),
])
def test_new_settings_are_validated(tiny_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_cfg(**{k.replace(".", "__"): v for k, v in overrides.items()})


def test_new_settings_are_logged_as_params(tiny_cfg):
    from core.data import load_images
    from core.device import ExecPath
    from core.fastpath import PathChoice
    from core.runner import run_params
    cfg = tiny_cfg(train__loss="hinge", train__ema_kimg=0.02, eval__g_mode="standing", model__d_spectral_norm=True)
    params = run_params(cfg, load_images(cfg.data, cfg.model.resolution), PathChoice(ExecPath("fp32", False), "explicit"))
    assert {k: params[k] for k in ("train.loss", "train.ema_kimg", "train.ema_rampup", "train.r1_gamma",
                                    "train.r1_interval", "train.augment", "eval.g_mode", "eval.standing_batches",
                                    "model.d_spectral_norm", "model.d_sn_keep_bn")} == {
        "train.loss": "hinge", "train.ema_kimg": 0.02, "train.ema_rampup": 0.0, "train.r1_gamma": 0.0,
        "train.r1_interval": 16, "train.augment": "none", "eval.g_mode": "standing", "eval.standing_batches": 16,
        "model.d_spectral_norm": True, "model.d_sn_keep_bn": True}
