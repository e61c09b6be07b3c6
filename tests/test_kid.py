"""KID: clean-fid's value on the same subsets, ~0 between halves of one distribution, > 0 under a shift."""

from __future__ import annotations

import numpy as np
import pytest

cleanfid = pytest.importorskip("cleanfid.fid")

from core import kid  # noqa: E402


def _clean_fid_kid(monkeypatch, feats1, feats2, seed, **kw) -> float:
    """clean-fid's kernel_distance with np.random.choice drawing from the Generator kernel_distance seeds."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(np.random, "choice", lambda a, size, replace=True: rng.choice(a, size, replace=replace))
    value = cleanfid.kernel_distance(feats1, feats2, **kw)
    monkeypatch.undo()
    return value


@pytest.mark.parametrize("cached", [True, False], ids=["kernel-matrix", "per-subset"])
def test_equals_clean_fid_on_the_same_subsets(monkeypatch, cached):
    rng = np.random.default_rng(0)
    feats1 = np.abs(rng.normal(0.4, 0.3, (700, 128)))  # non-negative like pooled Inception features
    feats2 = np.abs(rng.normal(0.45, 0.3, (500, 128)))  # a different size, so the draw order matters
    kw = dict(num_subsets=25, max_subset_size=300)
    ref = _clean_fid_kid(monkeypatch, feats1, feats2, seed=7, **kw)
    if not cached:
        monkeypatch.setattr(kid, "_CACHE_ENTRIES", 0)
    mean, std_error = kid.kernel_distance(feats1, feats2, seed=7, **kw)
    assert ref > 1e-3 and mean == pytest.approx(ref, rel=1e-6)
    assert 0 < std_error < mean / 5
    # another seed draws other subsets: close, but not identical
    assert kid.kernel_distance(feats1, feats2, seed=8, **kw)[0] != mean


def test_halves_of_one_distribution_give_kid_near_0_and_a_shift_does_not():
    # 2048-d like Inception; pools 10x the subset size, so the subset standard error is not dominated by overlap
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 1, (2000, 2048))
    mean, std_error = kid.kernel_distance(feats[:1000], feats[1000:], max_subset_size=100)
    assert abs(mean) < 3 * std_error, (mean, std_error)
    shifted, shifted_error = kid.kernel_distance(feats[:1000], feats[1000:] + 0.05, max_subset_size=100)
    assert shifted > 10 * shifted_error and shifted > 10 * abs(mean), (shifted, shifted_error, mean)


def test_small_pools_get_a_jackknife_error_where_subsets_see_none():
    # both pools no larger than a subset: every subset is the whole pool, so the subsets cannot disagree
    rng = np.random.default_rng(1)
    feats = rng.normal(0, 1, (400, 64))
    mean, subset_error = kid.kernel_distance(feats[:200], feats[200:], num_subsets=10)
    assert subset_error == pytest.approx(0, abs=1e-12) and mean != 0
    assert np.isnan(kid.kernel_distance(feats[:200], feats[200:], num_subsets=1)[1])
    e = kid.estimate(feats[:200], feats[200:], num_subsets=10)
    assert e.value == mean and e.std_error == pytest.approx(e.jackknife_std_error) and e.std_error > 0


def _brute_jackknife(y, x, seed, num_subsets, max_subset_size):
    """Delete each sample of each pool in turn and recompute the subset mean from scratch, same subsets."""
    rng, d = np.random.default_rng(seed), x.shape[1]
    m = min(len(x), len(y), max_subset_size)
    subsets = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)) for _ in range(num_subsets)]

    def mmd(xs, ys):
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((xs, xs), (ys, ys), (xs, ys)))
        return ((kxx.sum() - np.trace(kxx)) / (len(xs) * (len(xs) - 1))
                + (kyy.sum() - np.trace(kyy)) / (len(ys) * (len(ys) - 1)) - 2 * kxy.mean())

    def stat(drop_x=-1, drop_y=-1):
        return np.mean([mmd(x[ix[ix != drop_x]], y[iy[iy != drop_y]]) for ix, iy in subsets])

    var = 0.0
    for loo in ([stat(drop_x=i) for i in range(len(x))], [stat(drop_y=j) for j in range(len(y))]):
        loo = np.array(loo)
        var += (len(loo) - 1) / len(loo) * ((loo - loo.mean()) ** 2).sum()
    return np.sqrt(var)


@pytest.mark.parametrize("cached", [True, False], ids=["kernel-matrix", "per-subset"])
@pytest.mark.parametrize("num_subsets,max_subset_size", [(4, 1000), (6, 15)], ids=["whole-pools", "subsets"])
def test_jackknife_equals_deleting_each_sample(monkeypatch, cached, num_subsets, max_subset_size):
    rng = np.random.default_rng(2)
    y, x = rng.normal(0, 1, (30, 12)), rng.normal(0.2, 1, (22, 12))
    if not cached:
        monkeypatch.setattr(kid, "_CACHE_ENTRIES", 0)
    e = kid.estimate(y, x, num_subsets, max_subset_size, seed=5)
    assert e.jackknife_std_error == pytest.approx(_brute_jackknife(y, x, 5, num_subsets, max_subset_size), rel=1e-9)


def _null_and_shifted(shift: float, seeds: int, n_gen: int = 128, n_ref: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """KID and its standard error for `seeds` draws of Inception-like features (2048-d, non-negative)."""
    out = []
    for seed in range(seeds):
        f = np.abs(np.random.default_rng(seed).normal(0.3, 0.4, (n_ref + n_gen, 2048)))
        e = kid.estimate(f[:n_ref], f[n_ref:] + shift)
        out.append((e.value, e.std_error))
    return np.array(out).T


def test_null_halves_of_a_gaussian_stay_within_3_standard_errors():
    # the quick preset's shape: 128 generated against 512 reference features, subsets of all 128
    values, errors = _null_and_shifted(0.0, 20)
    assert (errors > 0).all()
    assert (np.abs(values) < 3 * errors).sum() >= 18, np.abs(values) / errors


def test_standard_error_is_calibrated_where_subsets_understate_it():
    # Over 80 draws the error should match the KID's actual spread. Under a real difference the jackknife is
    # consistent (measured 1.00-1.16); under the null (a degenerate U-statistic) it is conservative (measured
    # 1.4-1.5). The subset error alone understates both by a factor of 7 to 25.
    for shift, lo, hi in ((0.03, 0.8, 1.3), (0.0, 1.0, 1.8)):
        values, errors = _null_and_shifted(shift, 80)
        ratio = errors.mean() / values.std(ddof=1)
        assert lo < ratio < hi, (shift, ratio)


def test_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same d"):
        kid.kernel_distance(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        kid.kernel_distance(np.zeros((1, 4)), np.zeros((10, 4)))


# ---- KID in a run --------------------------------------------------------------------------------------------
def test_a_run_logs_kid_beside_fid_and_best_values_per_sample_count(tiny_cfg, store, tmp_path):
    from core.build import share_images
    from core.data import load_images
    from core.runner import execute_run
    # training evaluations on 16 samples at 16 images; the final one on 24: never a candidate for best
    cfg = tiny_cfg(eval__fid_every_kimg=0.016, eval__fid_samples=16, eval__fid_final_samples=24)
    tracker = store.start_run("kid-test", "one", {"variant": "baseline"})
    images = share_images(cfg, load_images(cfg.data, cfg.model.resolution))
    result = execute_run(cfg, tracker, tmp_path / "run", images=images)
    tracker.finish()
    run = store.client.get_run(tracker.run_id)
    m, history = run.data.metrics, lambda key: [(p.step, p.value) for p in store.client.get_metric_history(run.info.run_id, key)]
    assert run.data.params["derived.primary_metric"] == "kid" and run.data.params["eval.primary_metric"] == "auto"
    assert [s for s, _ in history("kid/kid16")] == [16] and [s for s, _ in history("kid/kid24")] == [32]
    assert m["kid/final"] == m["kid/kid24"] == result.final["kid"] and m["fid/final"] == m["fid/fid24"]
    assert m["kid/final_std"] > 0  # 24 generated vs 32 reference: every subset is the whole pool, yet an error
    # (this tiny G still draws one image, so its FID does not depend on the sample count: KID tells them apart)
    assert m["kid/best"] == m["kid/kid16"] != m["kid/final"] and m["fid/best"] == m["fid/fid16"]
    assert result.best == {"fid": m["fid/fid16"], "kid": m["kid/kid16"]}
    assert run.data.tags["fid_protocol.kid_subsets"] == "100 x 24"


def test_best_values_compare_only_evaluations_on_the_training_sample_count(tiny_cfg):
    from core import records as rec
    from core.bookkeeping import MetricLog
    from tests.helpers import build
    cfg = tiny_cfg(eval__fid_every_kimg=0.016, eval__fid_samples=16, eval__fid_final_samples=24)
    trainer = build(cfg, with_fid=False)
    fid16, kid16, fid24, kid24 = (rec.train_key(f, n) for n in (16, 24) for f in (rec.FID, rec.KID))
    # the final 24-sample values are the lowest, but biased differently: they never compete with the 16-sample ones
    for nimg, metrics in [(16, {fid16: 50.0, kid16: 0.5}), (24, {fid16: 55.0, kid16: 0.4}),
                          (32, {fid24: 40.0, kid24: 0.3}), (40, {kid16: float("nan")})]:
        trainer.metric_log.add(nimg, metrics)
    assert trainer.best_values() == {rec.FID: 50.0, rec.KID: 0.4}
    trainer.metric_log = MetricLog()
    trainer.metric_log.add(32, {fid24: 40.0})  # no training evaluation: the final count is the only one
    assert trainer.best_values() == {rec.FID: 40.0}
