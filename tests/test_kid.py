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


def test_std_error_counts_subset_noise_only():
    # both pools no larger than a subset: every subset is the whole pool, so the subsets cannot disagree
    rng = np.random.default_rng(1)
    feats = rng.normal(0, 1, (400, 64))
    mean, std_error = kid.kernel_distance(feats[:200], feats[200:], num_subsets=10)
    assert std_error == pytest.approx(0, abs=1e-12) and mean != 0
    assert np.isnan(kid.kernel_distance(feats[:200], feats[200:], num_subsets=1)[1])


def test_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same d"):
        kid.kernel_distance(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        kid.kernel_distance(np.zeros((1, 4)), np.zeros((10, 4)))


# ---- KID in a run --------------------------------------------------------------------------------------------
def test_a_run_logs_kid_beside_fid_and_best_values_per_sample_count(tiny_cfg, store, tmp_path):
    from core.data import load_images
    from core.runner import execute_run
    # training evaluations on 16 samples at 16 images; the final one on 24: never a candidate for best
    cfg = tiny_cfg(eval__fid_every_kimg=0.016, eval__fid_samples=16, eval__fid_final_samples=24)
    tracker = store.start_run("kid-test", "one", {"variant": "baseline"})
    result = execute_run(cfg, tracker, tmp_path / "run", images=load_images(cfg.data, cfg.model.resolution))
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
