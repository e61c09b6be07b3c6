"""Every ablation changes what it claims, in the built objects and the running loop, not only in the config."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import core.augment as augment_mod
import core.losses as losses_mod
import core.regularizers as regularizers_mod
from ablations import Ablation, get_ablation, list_ablations, register_ablation
from ablations import registry
from tests.helpers import build as build_on_images
from core.errors import UserError
from core.config import flatten, resolve, validate
from studies.run.study import StudySpec, resolve_configs

CASES = [(name, variant) for name in list_ablations() for variant in get_ablation(name).variants]


def observe(trainer, steps: int = 4) -> dict:
    """What a run really does: layers, optimizers, loss kind and targets, optimizer and phase steps, batches,
    augmentation and R1 calls, spectral norm on D, G_ema, images seen.

    BCE targets are told apart by the logits they come with: D's outputs on what G generated are 'fake', on
    anything else 'real'. So each D step gives its (real, fake) target pair, whatever order the loss terms are
    written in, and each G step its target for the fake logits.
    """
    batches, opt_steps, calls, kinds = [], {"D": 0, "G": 0}, {}, set()
    targets, pending, fakes, views, outputs = {"D": [], "G": []}, {}, [], {}, []

    def spy_bce(real_fn):
        def spy(logits, target, *a, **k):
            seen = logits.detach().float()
            (kind,) = {kind for kind, out in outputs
                       if out.shape == seen.shape and torch.equal(out.detach().float(), seen)}
            pending[kind] = round(float(target.flatten()[0]), 6)
            return real_fn(logits, target, *a, **k)
        return spy

    G, D, d_view = trainer.G_train, trainer.D_train, trainer._d_view
    trainer.G_train = lambda z: (fakes.append(G(z)), fakes[-1])[1]

    def view(x):  # what D is shown (augmented or not), and whether it came from G
        out = d_view(x)
        views[id(out)] = ("fake" if any(x is f for f in fakes) else "real", out)
        return out

    trainer._d_view = view
    trainer.D_train = lambda x: (outputs.append((views.get(id(x), ("other",))[0], D(x))), outputs[-1][1])[1]

    def spy_loss(real_fn):
        def spy(kind, *a, **k):
            kinds.add(kind)
            return real_fn(kind, *a, **k)
        return spy

    def counted(name, real_fn):
        def spy(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real_fn(*a, **k)
        return spy

    spies = [(losses_mod.F, "binary_cross_entropy_with_logits", spy_bce), (losses_mod, "d_loss", spy_loss),
             (losses_mod, "g_loss", spy_loss), (augment_mod, "xflip", lambda f: counted("xflip", f)),
             (augment_mod, "diff_augment", lambda f: counted("diff_augment", f)),
             (regularizers_mod, "r1_penalty", lambda f: counted("r1_penalty", f))]
    for name, opt in (("D", trainer.opt_d), ("G", trainer.opt_g)):
        def stepped(*a, _s=opt.step, _n=name, **k):
            opt_steps[_n] += 1
            targets[_n].append((pending.get("real"), pending.get("fake")) if _n == "D" else pending.get("fake"))
            for seen in (pending, views, fakes, outputs):
                seen.clear()
            return _s(*a, **k)
        opt.step = stepped
    draw = trainer.batches.next
    trainer.batches.next = lambda n: (batches.append(n), draw(n))[1]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in spies]
    for owner, attr, wrap in spies:
        setattr(owner, attr, wrap(getattr(owner, attr)))
    try:
        for _ in range(steps):
            trainer.train_step()
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)

    def layers(module):
        return [(type(m).__name__, getattr(m, "negative_slope", None)) for m in module.modules()
                if not isinstance(m, (nn.Sequential,)) and type(m).__name__ not in ("Generator", "Discriminator", "CSPup")]

    def groups(opt):
        return [(type(opt).__name__, g["lr"], g["weight_decay"], g["betas"]) for g in opt.param_groups]

    return {"G layers": layers(trainer.G), "D layers": layers(trainer.D), "opt_g": groups(trainer.opt_g),
            "opt_d": groups(trainer.opt_d), "d targets": sorted(set(targets["D"]), key=str),
            "g targets": sorted(set(targets["G"]), key=str), "losses": sorted(kinds),
            "opt steps": opt_steps, "phase steps": dict(trainer.phase_steps), "batches": batches, "calls": calls,
            "D spectral norm": sum(parametrize.is_parametrized(m, "weight") for m in trainer.D.modules()),
            "G_ema": trainer.G_ema is not None, "nimg": trainer.nimg}


@pytest.fixture
def build(tiny_cfg):
    def make(name: str, variant: str):
        from core import config as config_mod
        # the tiny test config, then the variant's overrides on top
        cfg = config_mod.apply_overrides(tiny_cfg(), get_ablation(name).overrides(variant))
        config_mod.validate(cfg)
        return build_on_images(cfg, with_fid=False)
    return make


@pytest.mark.parametrize("name,variant", [c for c in CASES if c[1] != "baseline"])
def test_every_variant_really_changes_the_run(build, name, variant):
    """Generic, so a newly registered plugin is covered from day one: its run differs observably."""
    assert observe(build(name, variant)) != observe(build(name, "baseline"))


@pytest.mark.parametrize("name", list_ablations())
def test_plugin_shape(name):
    ablation = get_ablation(name)
    assert list(ablation.variants)[0] == "baseline"
    # the baseline is the preset unchanged; it may pin what its own variants vary (ema pins G_ema off, which the
    # cpu preset turns on), and only to the default preset's values
    pinned = ablation.variants["baseline"]
    assert set(pinned) <= {k for v, o in ablation.variants.items() if v != "baseline" for k in o}
    assert all(flatten(resolve("default"))[k] == value for k, value in pinned.items())
    assert ablation.summary and len((type(ablation).__doc__ or "").split()) >= 25  # a real rationale
    for variant in ablation.variants:  # every variant resolves under both presets
        for preset in ("quick", "default"):
            resolve_configs(StudySpec(ablation=name, preset=preset, variants=(variant,)))


def test_pooling_layers(build):
    seen = {v: observe(build("pooling", v))["D layers"] for v in ("baseline", "maxpool", "avgpool")}
    assert ("MaxPool2d", None) not in seen["baseline"] and ("AvgPool2d", None) not in seen["baseline"]
    for variant, pool in (("maxpool", "MaxPool2d"), ("avgpool", "AvgPool2d")):
        names = [n for n, _ in seen[variant]]
        assert names.count(pool) == 3
        assert all(names[i - 1] in ("ReLU", "BatchNorm2d") for i, n in enumerate(names) if n == pool)


def test_leaky_bn_activation_and_norm_placement(build):
    def order(variant, net):
        return [n for n, _ in observe(build("leaky_bn", variant))[f"{net} layers"]
                if n in ("Identity", "Linear", "Conv2d", "ConvTranspose2d", "BatchNorm2d", "ReLU", "LeakyReLU")]
    for net in ("G", "D"):
        base = order("baseline", net)
        assert "LeakyReLU" not in base and "ReLU" in base
        leaky = observe(build("leaky_bn", "leaky"))[f"{net} layers"]
        assert ("ReLU", None) not in leaky and ("LeakyReLU", 0.2) in leaky
        after_conv, after_act = order("leaky", net), order("leaky_bn_after_act", net)
        bn_prev = lambda seq: {seq[i - 1] for i, n in enumerate(seq) if n == "BatchNorm2d"}
        act_prev = lambda seq: {seq[i - 1] for i, n in enumerate(seq) if n == "LeakyReLU"}
        # after_conv: conv -> BN -> act (G's stem 'conv' is the Identity after its Linear layer)
        assert bn_prev(after_conv) == ({"Conv2d", "Identity"} if net == "G" else {"Conv2d"})
        assert act_prev(after_conv) == {"BatchNorm2d", "Conv2d"} if net == "D" else act_prev(after_conv) == {"BatchNorm2d"}
        assert bn_prev(after_act) == {"LeakyReLU"}
        assert "BatchNorm2d" not in order("leaky_no_bn", net)


def test_weight_decay_reaches_the_optimizer(build):
    base, l2, adamw = (observe(build("weight_decay", v)) for v in ("baseline", "l2_1e-3", "adamw_1e-2"))
    assert {g[2] for g in base["opt_g"] + base["opt_d"]} == {0.0}
    assert {g[:1] + g[2:3] for g in l2["opt_g"] + l2["opt_d"]} == {("Adam", 1e-3)}
    assert {g[:1] + g[2:3] for g in adamw["opt_g"] + adamw["opt_d"]} == {("AdamW", 1e-2)}


def test_ttur_learning_rates_in_param_groups(build):
    ttur = observe(build("ttur", "ttur"))
    assert ttur["opt_d"][0][1] == pytest.approx(4e-4) and ttur["opt_g"][0][1] == pytest.approx(1e-4)
    ratio = observe(build("ttur", "ratio_10"))
    assert ratio["opt_d"][0][1] / ratio["opt_g"][0][1] == pytest.approx(10)


def test_label_smoothing_targets_reach_the_loss(build):
    """(real, fake) target pairs of every D step, matched to D's outputs on real and on generated images."""
    def seen(variant):
        run = observe(build("label_smoothing", variant))
        return run["d targets"], run["g targets"]
    assert seen("baseline") == ([(1.0, 0.0)], [1.0])
    assert seen("real_0.9") == ([(0.9, 0.0)], [1.0])  # G's target for its fakes stays 1
    assert seen("real_0.8") == ([(0.8, 0.0)], [1.0])
    assert seen("two_sided") == ([(0.9, 0.1)], [1.0])


@pytest.mark.parametrize("variant,d_steps", [("baseline", 4), ("n_dis_2", 8), ("n_dis_5", 20), ("d_every_2", 2)])
def test_n_dis_optimizer_step_counts(build, variant, d_steps):
    seen = observe(build("n_dis", variant), steps=4)
    assert seen["opt steps"] == {"D": d_steps, "G": 4}
    assert len(seen["batches"]) == d_steps  # each D update draws a fresh real batch


def test_batch_size_holds_images_seen_equal(tiny_cfg):
    from core import config as config_mod
    results = {}
    for variant in ("baseline", "batch_64", "batch_256"):
        cfg = config_mod.apply_overrides(tiny_cfg(train__kimg=0.512), get_ablation("batch_size").overrides(variant))
        trainer = build_on_images(cfg, with_fid=False)
        drawn = []
        draw = trainer.batches.next
        trainer.batches.next = lambda n, _d=draw: (drawn.append(n), _d(n))[1]
        result = trainer.run()
        results[variant] = (cfg.train.batch_size, set(drawn), result.step, result.nimg)
    assert results["batch_64"] == (64, {64}, 8, 512)
    assert results["batch_256"] == (256, {256}, 2, 512)
    assert results["baseline"][3] == 512


def test_a_variant_that_is_the_presets_own_config_is_left_out_of_its_study(capsys):
    from studies.run.__main__ import main
    from studies.run.study import left_out
    cpu, default = StudySpec(ablation="batch_size", preset="cpu"), StudySpec(ablation="batch_size", preset="default")
    assert list(resolve_configs(cpu)) == ["baseline", "batch_32", "batch_256"] and left_out(cpu, resolve_configs(cpu)) == ["batch_64"]
    assert list(resolve_configs(default)) == ["baseline", "batch_32", "batch_64", "batch_256"]
    assert left_out(default, resolve_configs(default)) == []
    assert main(["batch_size", "--preset", "cpu", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "batch_size: batch_64 left out: under preset cpu it is the baseline's own config" in err
    assert '"batch_64"' not in out and '"batch_32"' in out


def test_lr_scaling_rule_for_batch_size(tiny_cfg):
    from core import config as config_mod
    for rule, factor in (("none", 1), ("sqrt", math.sqrt(8)), ("linear", 8)):
        cfg = tiny_cfg(train__batch_size=64, optim__lr_ref_batch=8, optim__lr_scaling=rule)
        trainer = build_on_images(cfg, with_fid=False)
        assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(2e-4 * factor)
        assert trainer.opt_d.param_groups[0]["lr"] == pytest.approx(2e-4 * factor)  # what D's updates use
        assert config_mod.derive(cfg).lr_d == pytest.approx(2e-4 * factor)
    # TTUR's two rates, each scaled: the optimizers, not only the derived values
    cfg = config_mod.apply_overrides(tiny_cfg(train__batch_size=64, optim__lr_ref_batch=8, optim__lr_scaling="linear"),
                                     get_ablation("ttur").overrides("ttur"))
    trainer = build_on_images(cfg, with_fid=False)
    assert trainer.opt_d.param_groups[0]["lr"] == pytest.approx(4e-4 * 8)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(1e-4 * 8)


def test_base_variant_is_applied_and_clashes_are_refused(monkeypatch):
    configs = resolve_configs(StudySpec(ablation="pooling", base=(("ttur", "ttur"),)))
    assert {c.optim.lr_d for c in configs.values()} == {4e-4}
    assert configs["maxpool"].model.d_downsample == "maxpool"

    class SlowG(Ablation):
        """test-only"""
        name = "slow_g"
        variants = {"baseline": {}, "slow": {"optim.lr_g": 1e-5}}
    monkeypatch.setitem(registry._REGISTRY, "slow_g", SlowG)
    with pytest.raises(UserError, match="sets optim.lr_g, which 'ttur' varies"):
        resolve_configs(StudySpec(ablation="ttur", base=(("slow_g", "slow"),)))
    with pytest.raises(UserError, match="which another --base already sets"):
        resolve_configs(StudySpec(ablation="pooling", base=(("ttur", "ttur"), ("slow_g", "slow"))))
    with pytest.raises(UserError, match="is the ablation under study"):
        resolve_configs(StudySpec(ablation="ttur", base=(("ttur", "ttur"),)))
    with pytest.raises(UserError, match="varied by 'ttur'"):
        resolve_configs(StudySpec(ablation="ttur", overrides={"optim.lr_g": 1e-3}))
    with pytest.raises(UserError, match="has no variant 'fast'"):
        resolve_configs(StudySpec(ablation="ttur", variants=("fast",)))


def test_registry_refuses_duplicates_and_lists_names_for_unknown():
    with pytest.raises(ValueError, match="registered twice"):
        @register_ablation
        class Clash(Ablation):
            """dup"""
            name = "pooling"
            variants = {"baseline": {}}
    with pytest.raises(UserError, match="unknown ablation 'nope'; known: .*weight_decay"):
        get_ablation("nope")
    for baseline in ({"model.width": 1.0}, {"train.ema_kimg": 5.0}):  # a key no variant varies; not the default
        with pytest.raises(ValueError, match="its baseline may pin only keys its variants vary"):
            register_ablation(type("Pinned", (Ablation,), {"__doc__": "pins", "name": "pinned", "variants": {
                "baseline": baseline, "on": {"train.ema_kimg": 10.0}}}))
    assert "pinned" not in list_ablations()


def test_plugins_from_other_installed_packages_register_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "third_party_trick.py").write_text(
        "from ablations import Ablation\n"
        "class Spectral(Ablation):\n"
        "    '''A plugin living in another package.'''\n"
        "    name = 'third_party'\n"
        "    variants = {'baseline': {}, 'wide': {'model.width': 2.0}}\n")
    dist = tmp_path / "third_party_trick-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-trick\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nthird_party = third_party_trick:Spectral\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "third_party" in list_ablations()
    assert get_ablation("third_party").overrides("wide") == {"model.width": 2.0}


def test_stabiliser_bases_compose_and_nonsense_is_refused():
    configs = resolve_configs(StudySpec(ablation="n_dis", base=(("spectral_norm", "sn"),)))
    assert all(c.model.d_spectral_norm and c.model.d_sn_keep_bn for c in configs.values())
    assert configs["n_dis_5"].train.n_dis == 5
    stacked = resolve_configs(StudySpec(ablation="loss", base=(("ema", "ema_10"), ("r1", "r1_10"), ("augment", "diffaug"),
                                                               ("spectral_norm", "sn_no_bn"))))
    assert {(c.train.loss, c.train.ema_kimg, c.train.r1_gamma, c.train.augment, c.model.d_sn_keep_bn)
            for c in stacked.values()} == {(k, 10.0, 10.0, "diffaug", False) for k in ("bce", "hinge", "lsgan")}
    with pytest.raises(UserError, match="train.loss=hinge has margins, not targets"):
        resolve_configs(StudySpec(ablation="label_smoothing", base=(("loss", "hinge"),)))
    with pytest.raises(UserError, match="train.loss=hinge has margins, not targets"):
        resolve_configs(StudySpec(ablation="loss", base=(("label_smoothing", "real_0.9"),)))
    resolve_configs(StudySpec(ablation="label_smoothing", base=(("loss", "lsgan"),)))  # LS targets are labels
    with pytest.raises(UserError, match="sets train.loss, which another --base already sets"):
        resolve_configs(StudySpec(ablation="pooling", base=(("loss", "hinge"), ("loss", "lsgan"))))
    with pytest.raises(UserError, match="removes D's BatchNorm"):
        resolve_configs(StudySpec(ablation="leaky_bn", base=(("spectral_norm", "sn_no_bn"),)))


def test_cspup_blocks_have_the_batchnorm_they_claim(tiny_cfg):
    """Per CSPup block: BatchNorm count and where it sits (what the cspup ablation's variants claim)."""
    from core.models import CSPup
    cfg = tiny_cfg()
    blocks = {v: build_on_images(tiny_cfg(**{k.replace(".", "__"): x for k, x in get_ablation("cspup").overrides(v).items()}),
                       with_fid=False).G.blocks for v in get_ablation("cspup").variants}

    def bns(module) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    first = {v: b[0] for v, b in blocks.items()}  # a block that hands halves on
    last = {v: b[-1] for v, b in blocks.items()}  # the last one, into to_rgb
    assert all(isinstance(b, CSPup) for b in (*first.values(), *last.values())) and cfg.model.g_block == "open"
    # open: BatchNorm only after path B's two inner convs; path A and B's last conv are bare
    assert bns(first["baseline"].path_a) == 0 and bns(first["baseline"].path_b) == 2 and first["baseline"].post is None
    assert isinstance(last["baseline"].path_b[-1], torch.nn.Conv2d) and first["baseline"].path_b[0].kernel_size == (1, 1)
    # closed: A = ConvT + BN; B = 3x3 + BN + act, ConvT + BN, 3x3 + BN + act, 3x3 + BN (halves: one BN per half)
    assert bns(last["closed"].path_a) == 1 and bns(last["closed"].path_b) == 4
    assert bns(first["closed"].path_a) == 2 and bns(first["closed"].path_b) == 3 + 2
    kinds = [type(m).__name__ for m in last["closed"].path_b]
    assert kinds[:5] == ["Conv2d", "BatchNorm2d", "ReLU", "ConvTranspose2d", "BatchNorm2d"]
    assert last["closed"].path_b[0].kernel_size == (3, 3)
    assert [type(m).__name__ for m in last["closed"].path_b[-1]] == ["Conv2d", "BatchNorm2d"]
    # sum_bn: the open paths, then BatchNorm + act on the sum (per half where the block hands halves on)
    assert bns(last["sum_bn"].path_a) == 0 and bns(last["sum_bn"].path_b) == 2
    assert [type(m).__name__ for m in last["sum_bn"].post[0]] == ["BatchNorm2d", "ReLU"] and len(first["sum_bn"].post) == 2
    z = torch.randn(4, cfg.model.z_dim)
    for v, b in blocks.items():
        x = build_on_images(tiny_cfg(**{k.replace(".", "__"): x for k, x in get_ablation("cspup").overrides(v).items()}),
                  with_fid=False).G(z)
        assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all(), v


def test_a_closed_block_without_batchnorm_in_g_is_refused(tiny_cfg):
    from core.errors import UserError
    with pytest.raises(UserError, match="model.g_block='closed' adds BatchNorm to G's blocks"):
        validate(tiny_cfg(model__g_block="closed", model__g_norm="none"))
