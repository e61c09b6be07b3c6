"""The verdict's statistics: error rates by simulation through studies.verdict, and agreement with scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import brentq

from core.losses import min_d_loss
from studies.verdict import (VariantRecord, best, clopper_pearson, compare, failure_vs_baseline, holm,
                             min_detectable_diff, pooled_sd, seeds_needed, verdict, welch,
                             welch_power)

REPLICATES = 4000  # binomial sd of a 5% rate: 0.35 points


# ---- simulated studies ---------------------------------------------------------------------------------------
def test_null_study_at_3_seeds_holds_its_error_rates():
    # 3 variants identical to the baseline, 3 seeds each: the percentile bootstrap called 20.8% of these
    # significant per variant and 40.5% of studies had a "significant" variant
    rng = np.random.default_rng(0)
    cmp = compare(rng.normal(30, 1, (REPLICATES, 3)), rng.normal(30, 1, (REPLICATES, 3, 3)))
    per_variant, family = cmp.significant.mean(0), cmp.significant.any(1).mean()
    assert per_variant.max() <= 0.06, per_variant
    assert family <= 0.06, family
    assert family >= 0.01, family  # Welch at 3 vs 3 has size ~3.5%: a test that never fires is broken too
    assert np.array_equal(cmp.significant, cmp.p_holm < 0.05)


def test_two_sd_at_5_seeds_is_found():
    rng = np.random.default_rng(1)
    single = compare(rng.normal(0, 1, (REPLICATES, 5)), rng.normal(2, 1, (REPLICATES, 1, 5)))
    assert single.significant.mean() >= 0.6, single.significant.mean()  # one variant: ~0.77
    every = compare(rng.normal(0, 1, (REPLICATES, 5)), rng.normal(2, 1, (REPLICATES, 3, 5)))
    assert every.significant.mean(0).min() >= 0.6, every.significant.mean(0)  # all three real: ~0.64
    # one real effect among three variants pays Holm's price: at least Bonferroni's power at alpha/3 (~0.53)
    shift = np.array([2.0, 0.0, 0.0])[:, None]
    one = compare(rng.normal(0, 1, (REPLICATES, 5)), rng.normal(0, 1, (REPLICATES, 3, 5)) + shift)
    assert one.significant[:, 0].mean() >= welch_power(2, 1, 5, 5, alpha=0.05 / 3) - 0.03
    assert one.significant[:, 1:].mean() <= 0.06


@pytest.mark.parametrize("n_a,n_b", [(3, 3), (5, 5), (3, 5)])
def test_min_detectable_diff_has_80_percent_power(n_a, n_b):
    mde = min_detectable_diff(1.0, n_a, n_b)
    rng = np.random.default_rng(n_a * 10 + n_b)
    w = welch(rng.normal(0, 1, (20_000, n_a)), rng.normal(mde, 1, (20_000, n_b)))
    assert abs((w.p < 0.05).mean() - 0.8) <= 0.02, (mde, (w.p < 0.05).mean())  # binomial sd 0.003
    assert min_detectable_diff(2.5, n_a, n_b) == pytest.approx(2.5 * mde)


def test_min_detectable_diff_is_for_welch_not_student():
    # Student's t at 3 vs 3 (df 4) needs 3.07 sd; Welch's df is random and as low as 2, so it needs more
    crit = stats.t.ppf(0.975, 4)
    nc = brentq(lambda x: stats.nct.sf(crit, 4, x) + stats.nct.sf(crit, 4, -x) - 0.8, 0, 10)
    assert nc * math.sqrt(2 / 3) == pytest.approx(3.07, abs=0.01)
    assert min_detectable_diff(1.0, 3, 3) == pytest.approx(3.51, abs=0.01)
    assert math.isnan(min_detectable_diff(1.0, 1, 3))


def test_seeds_needed_inverts_the_mde():
    for n in (3, 5, 8):
        assert seeds_needed(min_detectable_diff(1.0, n, n) * 1.001, 1.0) == n
        assert seeds_needed(min_detectable_diff(1.0, n, n) * 0.98, 1.0) == n + 1
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1e-3, 1.0) is None  # beyond MAX_SEEDS
    assert pooled_sd([1, 2, 3], [10, 12, 14], [7]) == pytest.approx(math.sqrt((2 + 8) / 4))


# ---- agreement with scipy and hand-computed values -----------------------------------------------------------
@pytest.mark.parametrize("level", [0.95, 0.9])
def test_welch_equals_scipy(level):
    base, other = [30.1, 30.5, 29.8, 30.9], [29.0, 29.9, 28.7]
    ref = stats.ttest_ind(other, base, equal_var=False)
    ci = ref.confidence_interval(level)
    w = welch(base, other, level)
    assert w.diff == pytest.approx(np.mean(other) - np.mean(base))
    assert (w.lo, w.hi, w.p, w.df) == pytest.approx((ci.low, ci.high, ref.pvalue, ref.df), rel=1e-12)
    assert (w.n_a, w.n_b, w.note) == (4, 3, None)
    # batched over leading axes gives the same numbers, and non-finite values are dropped, not averaged
    batch = welch(np.array([base, base]), np.array([other + [np.nan], other + [np.inf]]), level)
    assert batch.p == pytest.approx([ref.pvalue] * 2) and batch.at(1).lo == pytest.approx(ci.low)


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy's own warning on the constant reference group
def test_welch_untestable_cases():
    few = welch([30.0], [29.0, 28.0, 27.0])
    assert few.note == "too few seeds" and math.isnan(few.p) and math.isnan(few.lo) and few.diff == -2.0
    assert welch([], [1.0, 2.0]).note == "too few seeds"
    flat = welch([30.1, 30.1, 30.1], [29.9, 29.9, 29.9])  # scipy says p ~ 0 here: certainty from no spread
    assert flat.note == "no seed-to-seed spread" and math.isnan(flat.p) and flat.diff == pytest.approx(-0.2)
    one_flat = welch([30.0, 30.0, 30.0], [29.0, 29.5, 28.8])  # one constant group is fine for Welch
    assert one_flat.note is None and one_flat.p == pytest.approx(stats.ttest_ind([29.0, 29.5, 28.8], [30.0] * 3,
                                                                                 equal_var=False).pvalue)


def test_holm_on_known_pvalues():
    # sorted 0.005 0.01 0.03 0.04, times 4 3 2 1 = 0.02 0.03 0.06 0.04, running max = 0.02 0.03 0.06 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.01, np.nan, 0.04, 0.03])  # NaN is not in the family: m = 3
    assert math.isnan(adjusted[1]) and adjusted[[0, 2, 3]] == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([[0.01, 0.04], [0.2, 0.01]]) == pytest.approx(np.array([[0.02, 0.04], [0.2, 0.02]]))
    assert holm([[0.01, 0.2], [0.04, 0.01]], axis=0) == pytest.approx(np.array([[0.02, 0.2], [0.04, 0.02]]))
    with pytest.raises(ValueError):
        holm([1.5])


def test_exact_failure_statistics():
    assert clopper_pearson(2, 3) == pytest.approx((0.0943, 0.9916), abs=1e-4)
    assert clopper_pearson(0, 3) == pytest.approx((0.0, 0.7076), abs=1e-4)
    assert clopper_pearson(3, 3) == pytest.approx((0.2924, 1.0), abs=1e-4)
    assert all(math.isnan(x) for x in clopper_pearson(0, 0))
    assert failure_vs_baseline(2, 3, 0, 3) == pytest.approx(0.4)  # at 3 seeds no failure count is significant
    assert failure_vs_baseline(5, 5, 0, 5) == pytest.approx(2 / 252)


def test_saturation_floor_of_smoothed_targets():
    # the floor the trainer's saturation watch measures from (core.losses, with BCE as the trainer's loss)
    assert min_d_loss("bce", 1.0, 0.0) == 0.0
    assert min_d_loss("bce", 0.9, 0.0) == pytest.approx(0.325, abs=5e-4)  # one-sided smoothing, real_0.9
    assert min_d_loss("bce", 0.9, 0.1) == pytest.approx(0.650, abs=5e-4)  # two-sided
    assert min_d_loss("bce", 0.9, 0.0) == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


# ---- the verdict -----------------------------------------------------------------------------------------------
BASE = VariantRecord("baseline", [30.1, 30.5, 29.8], {"finished": 3})


def test_a_variant_that_diverges_in_2_of_3_seeds_is_not_best():
    records = [BASE, VariantRecord("maxpool", [12.0], {"finished": 1, "diverged": 2}),
               VariantRecord("avgpool", [27.2, 27.5, 27.0], {"finished": 3})]
    by_name = {v.name: v for v in verdict(records)}
    mp = by_name["maxpool"]
    assert (mp.seeds, mp.finished, mp.failures, mp.mean) == (3, 1, 2, 12.0)  # the best metric of all
    assert (mp.failure_lo, mp.failure_hi) == pytest.approx((0.0943, 0.9916), abs=1e-4)
    assert mp.text.startswith("diverged in 2 of 3 seeds (rate 0.67, 95% CI 0.09-0.99)")
    assert "too few finished seeds" in mp.text and not mp.better and not mp.significant
    assert by_name["avgpool"].better and best(list(by_name.values())) == "avgpool"
    assert best(verdict(records[:2])) is None


def test_failing_significantly_more_often_blocks_better():
    records = [VariantRecord("baseline", list(30 + np.linspace(-0.5, 0.5, 8)), {"finished": 8}),
               VariantRecord("fragile", [20.1, 20.4, 19.9], {"finished": 3, "collapsed": 3, "d_saturated": 2})]
    fragile = verdict(records)[1]
    assert fragile.significant and fragile.gain > 0  # far lower FID on its lucky seeds ...
    assert fragile.fisher_p < 0.05 and fragile.fails_more and not fragile.better  # ... but fails 5 of 8
    assert fragile.text.startswith("failed in 5 of 8 seeds (collapsed 3, saturated D 2; rate 0.62")
    assert "not called better" in fragile.text and best(verdict(records)) is None
    assert fragile.mean == pytest.approx(np.mean([20.1, 20.4, 19.9]))  # failed seeds never enter the mean


def test_no_significant_difference_says_what_could_have_been_missed():
    records = [BASE, VariantRecord("a", [30.4, 30.9, 30.2], {"finished": 3}),
               VariantRecord("b", [30.0, 29.5, 29.9], {"finished": 3}),
               VariantRecord("c", [25.0, 25.3, 24.8], {"finished": 3, "unfinished": 1})]
    out = verdict(records)
    raw = [v.welch.p for v in out[1:]]
    assert [v.p_holm for v in out[1:]] == pytest.approx(list(holm(raw)))
    assert [v.significant for v in out[1:]] == [p < 0.05 for p in holm(raw)]
    a = out[1]
    assert not a.significant
    assert a.mde == pytest.approx(min_detectable_diff(pooled_sd(BASE.values, records[1].values), 3, 3))
    assert f"a difference smaller than {a.mde:.3g} could have been missed" in a.text
    assert f"about {a.seeds_for_diff} seeds per variant would detect" in a.text and a.seeds_for_diff > 3
    assert a.text.startswith("3 of 3 seeds finished") and a.finished == 3
    assert "1 unfinished, not counted" in out[3].text and out[3].seeds == 3
    higher = verdict(records, metric="IS", lower_is_better=False)
    assert higher[3].significant and not higher[3].better and "significantly worse" in higher[3].text


def test_verdict_refuses_inconsistent_records():
    with pytest.raises(ValueError, match="no record named"):
        verdict([VariantRecord("x", [1.0], {"finished": 1})])
    with pytest.raises(ValueError, match="2 metric values but 1 completed"):
        verdict([BASE, VariantRecord("x", [1.0, 2.0], {"finished": 1, "diverged": 1})])
