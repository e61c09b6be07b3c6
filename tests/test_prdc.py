"""PRDC: clovaai/prdc's values exactly, exact ties for copied fakes, and the four numbers' behaviour."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from core.errors import UserError
from core.prdc import prdc


def _package_reference(real, fake, k):
    """clovaai/prdc itself (`pip install prdc`; it prints the set sizes, hence the redirect)."""
    compute_prdc = pytest.importorskip("prdc").compute_prdc
    with contextlib.redirect_stdout(io.StringIO()):
        return {name: float(v) for name, v in compute_prdc(real, fake, k).items()}


def _transcribed_reference(real, fake, k):
    """clovaai/prdc `compute_prdc`, line for line, with scipy's cdist for sklearn's pairwise_distances."""
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]  # (k+1)-th smallest, the zero self-distance included
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(real, fake)
    inside = d < real_radii[:, None]
    return {"precision": inside.any(axis=0).mean(), "recall": (d < fake_radii[None, :]).any(axis=1).mean(),
            "density": (1.0 / k) * inside.sum(axis=0).mean(), "coverage": (d.min(axis=1) < real_radii).mean()}


def _features(seed, n_real=200, n_fake=150, dim=64):
    """Overlapping, differently shaped clouds (so no metric sits at 0 or 1), float32 like Inception features."""
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, dim)).astype(np.float32)
    fake = (0.1 + 1.05 * rng.normal(size=(n_fake, dim))).astype(np.float32)
    return real, fake


@pytest.mark.parametrize("reference", [_package_reference, _transcribed_reference], ids=["clovaai", "transcribed"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_reference(reference, k, seed):
    real, fake = _features(seed)
    expected = reference(real, fake, k)
    assert 0.05 < min(expected.values()) and max(expected.values()) < 0.98  # no metric saturated: a real check
    assert prdc(real, fake, k) == pytest.approx(expected, abs=1e-12)
    assert prdc(real, fake, k, chunk=37) == pytest.approx(expected, abs=1e-12)  # several blocks, a ragged last one


@pytest.mark.parametrize("reference", [_package_reference, _transcribed_reference], ids=["clovaai", "transcribed"])
def test_equals_the_reference_for_fakes_copied_from_the_reals(reference):
    # memorisation: every fake lies exactly on the edge of the balls of the reals whose k-th neighbour it copies
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 2048)).astype(np.float32)
    fake = real[rng.permutation(300)[:120]]
    for k in (1, 3, 5):
        assert prdc(real, fake, k, chunk=64) == pytest.approx(reference(real, fake, k), abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_copies_of_the_reals_sit_exactly_on_ball_edges(k):
    # Each real ball strictly holds its centre and k-1 neighbours, the k-th lies on the edge (strict `<`):
    # fakes equal to the reals give density exactly k/k = 1, and k = 1 fakes copying half the reals give
    # coverage exactly 1/2. 2048-d float32, where a matmul rounds equal columns differently.
    rng = np.random.default_rng(k)
    real = rng.normal(size=(400, 2048)).astype(np.float32)
    real[:, 0] = 0.0
    fake = real.copy()
    fake[:, 0] = -0.0  # the same vectors, other bytes
    assert prdc(real, fake, k, chunk=100) == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    if k == 1:
        half = prdc(real, real[rng.permutation(400)[:200]], 1, chunk=100)
        assert (half["precision"], half["density"], half["coverage"]) == (1.0, 1.0, 0.5)


def test_points_exactly_on_every_ball_edge_are_outside():
    # integer coordinates, so every distance is exact: fakes 10 apart on a line, each real 10 off a fake at right
    # angles, so every ball (k = 1, radius 10) has the nearest point of the other set on its edge: all four are 0
    j = np.arange(50.0)
    fake = np.zeros((50, 8))
    fake[:, 0] = 10 * j
    real = fake.copy()
    real[:, 1] = 10.0
    assert prdc(real, fake, 1, chunk=16) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    assert _transcribed_reference(real, fake, 1) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_chunk_size_does_not_change_the_result():
    real, fake = _features(4, n_real=300, n_fake=260)
    values = [prdc(real, fake, 5, chunk=c) for c in (1, 7, 64, 299, 300, 10_000)]
    assert all(v == values[0] for v in values)


def test_same_distribution_scores_near_1_on_all_four():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    got = prdc(real, fake, 5)
    # Naeem et al.: E[density] = 1 and E[coverage] = 1 - 2^-k for equal sizes; P/R sit lower in 16-d
    assert got["precision"] > 0.8 and got["recall"] > 0.8
    assert got["density"] == pytest.approx(1.0, abs=0.1) and got["coverage"] > 0.93


def test_mode_collapse_keeps_precision_and_loses_recall_and_coverage():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(1000, 16))
    modes = real[rng.choice(1000, 5, replace=False)]
    fake = modes[rng.integers(0, 5, 500)] + 0.01 * rng.normal(size=(500, 16))  # 5 tight clusters on real points
    got = prdc(real, fake, 5)
    assert got["precision"] > 0.99 and got["recall"] < 0.05 and got["coverage"] < 0.1


def test_one_fake_outlier_inflates_recall_but_not_coverage():
    # why density/coverage: an outlier's k-NN ball is huge, and recall trusts the fake balls
    rng = np.random.default_rng(7)
    real = rng.normal(size=(1000, 16))
    collapsed = 0.01 * rng.normal(size=(500, 16))
    outlier = np.zeros((1, 16))
    outlier[0, 0] = 100.0
    without, with_ = prdc(real, collapsed, 5), prdc(real, np.vstack([collapsed, outlier]), 5)
    assert without["recall"] == 0.0 and with_["recall"] > 0.3
    assert with_["coverage"] == without["coverage"] < 0.15


def test_a_far_shifted_fake_set_scores_0_on_all_four():
    real, fake = _features(8)
    assert prdc(real, fake + 50.0, 3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("real, fake, k, chunk, match", [
    (np.zeros(10), np.zeros((10, 4)), 3, 8, "2-D"),
    (np.zeros((10, 4)), np.zeros((0, 4)), 3, 8, "2-D"),
    (np.zeros((10, 4)), np.zeros((10, 5)), 3, 8, "dimension"),
    (np.zeros((10, 4)), np.zeros((10, 4)), 0, 8, "nearest_k"),
    (np.zeros((10, 4)), np.zeros((10, 4)), 2.0, 8, "nearest_k"),
    (np.zeros((10, 4)), np.zeros((3, 4)), 3, 8, "more than 3 samples"),
    (np.zeros((3, 4)), np.zeros((10, 4)), 3, 8, "more than 3 samples"),
    (np.full((10, 4), np.nan), np.zeros((10, 4)), 3, 8, "finite real"),
    (np.zeros((10, 4)), np.zeros((10, 4), dtype=complex), 3, 8, "finite real"),
    (np.zeros((10, 4)), np.zeros((10, 4)), 3, 0, "chunk"),
], ids=["1-d", "empty", "dim-mismatch", "k=0", "float-k", "k>=n_fake", "k>=n_real", "nan", "complex", "chunk=0"])
def test_bad_input_raises_user_error(real, fake, k, chunk, match):
    with pytest.raises(UserError, match=match):
        prdc(real, fake, k, chunk=chunk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    real, fake = _features(9, n_real=3000, n_fake=2000, dim=2048)
    assert prdc(real, fake, 5, device="cuda", chunk=512) == prdc(real, fake, 5)


def test_both_ks_from_one_pass_equal_each_k_alone():
    from core.prdc import prdc_at
    real, fake = _features(3)
    both = prdc_at(real, fake, (3, 5))
    assert both == {3: prdc(real, fake, 3), 5: prdc(real, fake, 5)}


def test_knn_radii_are_the_kth_neighbour_distances_and_zero_for_copies():
    from core.prdc import knn_radii
    real, _ = _features(4)
    expected = np.sort(cdist(real.astype(np.float64), real.astype(np.float64)), axis=1)[:, 5]  # self at column 0
    np.testing.assert_allclose(knn_radii(real, 5), expected, rtol=1e-9)
    one = np.repeat(real[:1], 20, axis=0)
    assert (knn_radii(one, 5) == 0).all()  # one image repeated: no spread at all


@pytest.mark.parametrize("k", [3, 5])
def test_identical_sets_score_1_on_precision_recall_and_coverage(k):
    real, _ = _features(5)
    out = prdc(real, real.copy(), k)
    assert (out["precision"], out["recall"], out["coverage"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("k", [3, 5])
def test_one_real_point_repeated_has_recall_and_coverage_near_0(k):
    real, _ = _features(6)
    out = prdc(real, np.repeat(real[7:8], 150, axis=0), k)
    assert out["recall"] == 0.0  # balls of radius 0 hold no real image
    assert out["coverage"] <= 5 / len(real)  # only reals whose own ball holds that one point: a handful at most
    assert out["precision"] == 1.0  # the copy sits inside the balls of its real neighbours


def test_a_random_half_of_the_reals_has_precision_1_and_recall_near_1_at_k5():
    real, _ = _features(7, n_real=400)
    half = real[np.random.default_rng(1).permutation(len(real))[:200]]
    out = prdc(real, half, 5)
    assert out["precision"] == 1.0  # every fake is a real point, inside its neighbours' balls
    assert out["recall"] > 0.9 and out["coverage"] > 0.9
