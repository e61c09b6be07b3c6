"""The statistics behind a report's verdict: Welch + Holm on the metric, exact tests on failures, detectable size.

Why not the percentile bootstrap the reports used: with 3 seeds per group it has only 10 distinct resamples per
group, shrinks the spread by sqrt((n-1)/n) and uses normal instead of t quantiles. In a simulation with
identical normal groups (600 replicates) it called 20.8% of null differences significant at 3 seeds and 10.8%
at 5 (Welch: 2.7% and 4.3%), and with three null variants against one baseline at least one was "significant"
40.5% of the time. So a variant is compared with the baseline by Welch's t-test on its finished seeds, and the
p-values of one study are Holm-adjusted across its variants: `significant` means Holm p < 0.05.

"No significant difference" is only useful with the size of difference the study could have seen, so every
comparison carries its minimum detectable difference (two-sided 5%, 80% power), computed for the Welch test
itself from the noncentral t (at 3 seeds the normal approximation is far too optimistic, and so is Student's
t: the Welch df is random and drops to n-1), and the number of seeds that would detect the observed difference.

Failed seeds are results, not missing data: a seed that diverged, collapsed, saturated D or crashed counts in
the variant's n for its failure rate (Clopper-Pearson interval, Fisher's exact test against the baseline),
while its metric stays out of the metric test, which runs on finished seeds only. The verdict names failures
first and never calls a variant better while it fails significantly more often than the baseline.

Everything here is a pure function of numbers: the report builds the records from MLflow, tests simulate them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import special, stats
from scipy.optimize import brentq

from core.records import COMPLETED, FAILURES, Outcome

ALPHA = 0.05  # family-wise error rate of one study, and the level of the failure-rate test
POWER = 0.8  # the power at which the minimum detectable difference is quoted
BASELINE = "baseline"
MAX_SEEDS = 1000  # seeds_needed gives up beyond this


# ---- the metric test ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Welch:
    """Welch's t-test of mean(other) - mean(baseline); floats for 1-D input, arrays over the leading axes else."""
    diff: float  # mean(other) - mean(baseline) over finite values; NaN when a group has none
    lo: float  # Welch t-interval at `level`; NaN when untestable (see note)
    hi: float
    p: float  # two-sided p-value; NaN when untestable
    df: float  # Welch-Satterthwaite degrees of freedom
    n_a: int  # finite baseline values
    n_b: int  # finite other values
    note: str | None  # None, 'too few seeds' (< 2 in a group) or 'no seed-to-seed spread' (for arrays: '' = None)

    def at(self, index) -> Welch:
        """The scalar result at `index` of a batched result."""
        pick = [np.asarray(getattr(self, f))[index].item() for f in ("diff", "lo", "hi", "p", "df", "n_a", "n_b")]
        return Welch(*pick, str(np.asarray(self.note)[index]) or None)


def _finite(x) -> np.ndarray:
    x = np.array(x, dtype=float)
    x[~np.isfinite(x)] = np.nan
    return x


def welch(baseline, other, level: float = 0.95) -> Welch:
    """Welch t-interval and p for mean(other) - mean(baseline), over the last axis; non-finite values are dropped."""
    a, b = _finite(baseline), _finite(other)
    n_a, n_b = np.isfinite(a).sum(-1), np.isfinite(b).sum(-1)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy warns on the slices we blank out below
        res = stats.ttest_ind(b, a, axis=-1, equal_var=False, nan_policy="omit")
        ci = res.confidence_interval(level)
        diff = np.nanmean(b, -1) - np.nanmean(a, -1)
        # relative: three copies of 30.1 have a variance of 2e-29, not 0
        varies = lambda x: np.nanstd(x, -1, ddof=1) > 1e-9 * np.nanmax(np.abs(x), -1, initial=0.0)  # noqa: E731
        spread = varies(a) | varies(b)
    n_a, n_b = np.broadcast_arrays(n_a, n_b)
    too_few = (n_a < 2) | (n_b < 2)
    # Both groups constant: the t statistic is 0/0 or d/0. Identical seeds carry no estimate of seed noise (a
    # broken seed, a clipped metric), so any difference would be "certain" on no evidence: untestable instead.
    flat = ~too_few & ~spread
    bad = too_few | flat
    blank = lambda v: np.where(bad, np.nan, np.asarray(v, dtype=float))  # noqa: E731
    note = np.where(too_few, "too few seeds", np.where(flat, "no seed-to-seed spread", ""))
    if note.ndim == 0:
        return Welch(float(diff), float(blank(ci.low)), float(blank(ci.high)), float(blank(res.pvalue)),
                     float(blank(res.df)), int(n_a), int(n_b), str(note) or None)
    return Welch(diff, blank(ci.low), blank(ci.high), blank(res.pvalue), blank(res.df), n_a, n_b, note)


def holm(pvalues, axis: int = -1) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values along `axis`; NaN stays NaN and is not counted in the family."""
    p = np.moveaxis(np.array(pvalues, dtype=float, ndmin=1), axis, -1)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(p, axis=-1)  # NaN sorts last, so it never enters a running maximum of finite values
    ranked = np.take_along_axis(p, order, -1)
    m = np.isfinite(p).sum(-1, keepdims=True)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(p.shape[-1])) * ranked, axis=-1))
    out = np.empty_like(p)
    np.put_along_axis(out, order, adjusted, -1)
    return np.moveaxis(out, -1, axis)


def _stack(groups) -> np.ndarray:
    """A list of groups of different sizes as one array padded with NaN (k, max n); arrays pass through."""
    if isinstance(groups, np.ndarray):
        return groups.astype(float)
    rows = [np.asarray(g, dtype=float).ravel() for g in groups]
    out = np.full((len(rows), max([len(r) for r in rows] + [0])), np.nan)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@dataclass(frozen=True)
class Comparison:
    welch: Welch  # one entry per variant
    p_holm: np.ndarray  # Holm-adjusted over the variants of the study
    significant: np.ndarray  # p_holm < alpha; False where untestable


def compare(baseline, variants, level: float = 0.95, alpha: float = ALPHA) -> Comparison:
    """Every variant against the baseline: Welch per variant, Holm across them; variants is (..., k, seeds)."""
    a = np.asarray(baseline, dtype=float)[..., None, :]
    w = welch(a, _stack(variants), level)
    p_holm = holm(w.p)
    return Comparison(w, p_holm, np.nan_to_num(p_holm, nan=1.0) < alpha)


# ---- how large a difference the seeds can see --------------------------------------------------------------
def pooled_sd(*groups) -> float:
    """Seed-to-seed sd pooled over groups (finite values, groups of one add nothing); NaN without 2 in a group."""
    ss, dof = 0.0, 0
    for g in groups:
        g = np.asarray(g, dtype=float)
        g = g[np.isfinite(g)]
        if len(g) > 1:
            ss += float(((g - g.mean()) ** 2).sum())
            dof += len(g) - 1
    return math.sqrt(ss / dof) if dof else math.nan


def _share_nodes(n_a: int, n_b: int, nodes: int = 48):
    # Gauss-Jacobi nodes for P ~ Beta((n_a-1)/2, (n_b-1)/2), P = baseline's share of the pooled sum of squares
    x, w = special.roots_jacobi(nodes, (n_b - 1) / 2 - 1, (n_a - 1) / 2 - 1)
    return (1 + x) / 2, w / w.sum()


def _power_nc(nc: float, n_a: int, n_b: int, alpha: float) -> float:
    # Both groups with sd s: S = pooled sum of squares / s^2 ~ chi2(nu) is independent of P (Lukacs), so given
    # P the Welch statistic is k(P) * T0 with T0 ~ nct(nu, nc), and its df is a function of P alone. Exact.
    nu = n_a + n_b - 2
    share, weight = _share_nodes(n_a, n_b)
    qa, qb = share / ((n_a - 1) * n_a), (1 - share) / ((n_b - 1) * n_b)  # (s^2/n) / (S s^2) per group
    df = (qa + qb) ** 2 / (qa ** 2 / (n_a - 1) + qb ** 2 / (n_b - 1))
    k = np.sqrt((1 / n_a + 1 / n_b) / (nu * (qa + qb)))
    crit = stats.t.ppf(1 - alpha / 2, df) / k
    # lower tail as sf at -nc: nct.cdf far in the tail returns NaN
    return float(weight @ (stats.nct.sf(crit, nu, nc) + stats.nct.sf(crit, nu, -nc)))


def welch_power(diff: float, sd: float, n_a: int, n_b: int, alpha: float = ALPHA) -> float:
    """Probability that the two-sided Welch test at `alpha` finds a true difference `diff` (both groups sd `sd`)."""
    if n_a < 2 or n_b < 2 or not (math.isfinite(diff) and math.isfinite(sd)):
        return math.nan
    if sd == 0:
        return 1.0 if diff != 0 else math.nan
    return _power_nc(abs(diff) / (sd * math.sqrt(1 / n_a + 1 / n_b)), n_a, n_b, alpha)


def min_detectable_diff(sd_pooled: float, n_a: int, n_b: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true difference the two-sided Welch test at these seed counts finds with probability `power`."""
    if n_a < 2 or n_b < 2 or not math.isfinite(sd_pooled):
        return math.nan
    gap = lambda nc: _power_nc(nc, n_a, n_b, alpha) - power  # noqa: E731
    hi = 1.0
    while gap(hi) < 0:  # power rises with nc; at 2 vs 2 seeds 80% needs nc near 12
        hi *= 2
    return brentq(gap, 0.0, hi, xtol=1e-10) * sd_pooled * math.sqrt(1 / n_a + 1 / n_b)


def seeds_needed(diff: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per group for the Welch test to find `diff` with probability `power`; None past MAX_SEEDS."""
    if not (math.isfinite(diff) and math.isfinite(sd)) or diff == 0:
        return None
    ok = lambda n: welch_power(diff, sd, n, n, alpha) >= power  # noqa: E731
    lo, hi = 1, 2  # ok(lo) is False by convention, find the first ok(hi)
    while not ok(hi):
        if hi >= MAX_SEEDS:
            return None
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


# ---- failures ----------------------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k failures in n seeds; NaN for n = 0."""
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def failure_vs_baseline(k_var: int, n_var: int, k_base: int, n_base: int) -> float:
    """Two-sided Fisher exact p for the variant's failure rate against the baseline's; NaN with no seeds."""
    if n_var == 0 or n_base == 0:
        return math.nan
    return float(stats.fisher_exact([[k_var, n_var - k_var], [k_base, n_base - k_base]]).pvalue)


# ---- the verdict -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantRecord:
    name: str
    values: Sequence[float]  # the metric of each finished seed (finished/stopped seeds only)
    outcomes: Mapping[str, int]  # seeds per outcome (core.records.Outcome): completed and failures count, others not


@dataclass(frozen=True)
class VariantVerdict:
    name: str
    seeds: int  # seeds with a result: completed + failed (unfinished seeds are not results)
    finished: int  # finite metric values: the n of the metric test
    mean: float  # metric mean and sd over the finished seeds
    sd: float
    failures: int  # diverged + collapsed + d_saturated + failed
    failure_rate: float
    failure_lo: float  # Clopper-Pearson interval of the failure rate
    failure_hi: float
    fisher_p: float  # failure rate against the baseline's; NaN for the baseline
    fails_more: bool  # fails significantly (Fisher p < alpha) more often than the baseline
    welch: Welch | None  # None for the baseline
    p_holm: float
    significant: bool  # Holm-adjusted p < alpha
    gain: float  # improvement over the baseline in the metric's good direction (> 0 = better)
    better: bool  # significant, in the good direction, and not failing significantly more often
    mde: float  # smallest difference these seeds detect with 80% power
    seeds_for_diff: int | None  # seeds per group that would detect the observed difference
    text: str


def _g(x: float, sign: bool = False) -> str:
    return format(x, "+.3g" if sign else ".3g") if math.isfinite(x) else "–"


@dataclass(frozen=True)
class _Failures:
    """The failure part of one variant's verdict: its seeds, its failures and their rate against the baseline's."""
    seeds: int
    failures: int
    rate: float
    lo: float
    hi: float
    fisher_p: float = math.nan
    fails_more: bool = False
    text: str = ""


def _count(r: VariantRecord) -> tuple[int, int, int]:
    """(seeds with a result, failures, unfinished seeds) of a record; more values than completed seeds is an error."""
    completed = sum(int(r.outcomes.get(o, 0)) for o in COMPLETED)
    failures = sum(int(r.outcomes.get(o, 0)) for o in FAILURES)
    finite = np.isfinite(_finite(r.values).ravel()).sum()
    if finite > completed:
        raise ValueError(f"{r.name}: {finite} metric values but {completed} completed seeds")
    skipped = sum(int(c) for o, c in r.outcomes.items() if o not in COMPLETED + FAILURES)
    return completed + failures, failures, skipped


def _failures(r: VariantRecord, base: VariantRecord | None, level: float, alpha: float) -> _Failures:
    """Failures of `r`, with Fisher's exact test against `base` (None: r is the baseline), and their sentence."""
    seeds, failures, skipped = _count(r)
    lo, hi = clopper_pearson(failures, seeds, level)
    rate = failures / seeds if seeds else math.nan
    if failures == 0:
        text = f"{seeds} of {seeds} seeds finished" if seeds else "no seed has a result"
    else:
        kinds = [(Outcome(f).verb, r.outcomes.get(f, 0)) for f in FAILURES if r.outcomes.get(f, 0)]
        what = (f"{kinds[0][0]} in {failures} of {seeds} seeds (" if len(kinds) == 1 else
                f"failed in {failures} of {seeds} seeds ({', '.join(f'{v} {k}' for v, k in kinds)}; ")
        text = f"{what}rate {failures / seeds:.2f}, 95% CI {lo:.2f}-{hi:.2f})"
    if skipped:
        text += f" ({skipped} unfinished, not counted)"
    if base is None:
        return _Failures(seeds=seeds, failures=failures, rate=rate, lo=lo, hi=hi, text=text)
    n_base, k_base, _ = _count(base)
    fisher_p = failure_vs_baseline(failures, seeds, k_base, n_base)
    fails_more = bool(fisher_p < alpha and rate > (k_base / n_base if n_base else math.nan))
    if seeds and n_base and (failures or k_base):
        text += (f"; baseline {k_base} of {n_base}, Fisher p {fisher_p:.2f}"
                 + (": fails significantly more often than the baseline" if fails_more else ""))
    return _Failures(seeds=seeds, failures=failures, rate=rate, lo=lo, hi=hi, fisher_p=fisher_p,
                     fails_more=fails_more, text=text)


@dataclass(frozen=True)
class _MetricTest:
    """The metric part of one variant's verdict: Welch against the baseline, Holm's p, what the seeds could see."""
    welch: Welch
    p_holm: float
    significant: bool
    gain: float
    mde: float
    needed: int | None


def _metric_test(cmp: Comparison, i: int, base_values: np.ndarray, values: np.ndarray, sign: float,
                 alpha: float) -> _MetricTest:
    w = cmp.welch.at(i)
    sd_pooled = pooled_sd(base_values, values)
    mde = min_detectable_diff(sd_pooled, w.n_a, w.n_b, alpha)
    needed = seeds_needed(abs(w.diff), sd_pooled, alpha) if math.isfinite(mde) else None
    return _MetricTest(welch=w, p_holm=float(cmp.p_holm[i]), significant=bool(cmp.significant[i]),
                       gain=sign * w.diff, mde=mde, needed=needed)


def _metric_text(t: _MetricTest, f: _Failures, base_rate: float, metric: str, lower_is_better: bool,
                 better: bool) -> str:
    """The metric sentence of a variant's verdict: better, worse, not tested, or what could have been missed."""
    w = t.welch
    where = f"{w.n_b} vs {w.n_a} finished seeds"
    stat = f"{_g(w.diff, True)} (95% CI {_g(w.lo, True)} to {_g(w.hi, True)}, Holm p {t.p_holm:.3g}, {where})"
    if w.note == "too few seeds":
        return f"{metric} not tested: too few finished seeds ({where}, 2 needed in each)"
    if w.note:
        return f"{metric} not tested: identical on every finished seed of both groups ({where}), no spread"
    if better:
        tail = f"{metric} significantly better: {stat}"
        if f.rate > base_rate:
            tail += "; it fails more often than the baseline, though not significantly at these seed counts"
        return tail
    if t.significant and t.gain > 0:
        return (f"{metric} {_g(abs(w.diff))} {'lower' if lower_is_better else 'higher'} on its finished "
                f"seeds {stat}, but not called better: it fails significantly more often than the baseline")
    if t.significant:
        return f"{metric} significantly worse: {stat}"
    tail = f"no significant difference in {metric}: {stat}; a difference smaller than {_g(t.mde)} could have been missed"
    if t.needed is not None and t.needed > max(w.n_a, w.n_b):
        tail += f"; about {t.needed} seeds per variant would detect {_g(abs(w.diff))}"
    elif t.needed is None and w.diff != 0:
        tail += f"; more than {MAX_SEEDS} seeds per variant would be needed to detect {_g(abs(w.diff))}"
    return tail


def verdict(records: Sequence[VariantRecord], metric: str = "FID", lower_is_better: bool = True,
            baseline: str = BASELINE, level: float = 0.95, alpha: float = ALPHA) -> list[VariantVerdict]:
    """Per variant, in the records' order: failures first, then the Holm-adjusted Welch comparison on the metric."""
    names = [r.name for r in records]
    if baseline not in names:
        raise ValueError(f"no record named {baseline!r} among {names}")
    base = records[names.index(baseline)]
    others = [r for r in records if r.name != baseline]
    values = {r.name: _finite(r.values).ravel() for r in records}
    values = {k: v[np.isfinite(v)] for k, v in values.items()}
    cmp = compare(values[baseline], [values[r.name] for r in others], level, alpha) if others else None
    base_failures = _failures(base, None, level, alpha)
    out = []
    for r in records:
        v = values[r.name]
        mean = float(v.mean()) if len(v) else math.nan
        sd = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        shared = dict(name=r.name, finished=len(v), mean=mean, sd=sd)
        if r.name == baseline:
            f = base_failures
            out.append(VariantVerdict(
                **shared, seeds=f.seeds, failures=f.failures, failure_rate=f.rate, failure_lo=f.lo, failure_hi=f.hi,
                fisher_p=math.nan, fails_more=False, welch=None, p_holm=math.nan, significant=False, gain=math.nan,
                better=False, mde=math.nan, seeds_for_diff=None,
                text=f"{f.text}; reference {metric} {_g(mean)} ± {_g(sd)} (sd) over {len(v)} finished seeds"))
            continue
        f = _failures(r, base, level, alpha)
        t = _metric_test(cmp, [o.name for o in others].index(r.name), values[baseline], v,
                         -1.0 if lower_is_better else 1.0, alpha)
        better = t.significant and t.gain > 0 and not f.fails_more
        tail = _metric_text(t, f, base_failures.rate, metric, lower_is_better, better)
        out.append(VariantVerdict(
            **shared, seeds=f.seeds, failures=f.failures, failure_rate=f.rate, failure_lo=f.lo, failure_hi=f.hi,
            fisher_p=f.fisher_p, fails_more=f.fails_more, welch=t.welch, p_holm=t.p_holm, significant=t.significant,
            gain=t.gain, better=better, mde=t.mde, seeds_for_diff=t.needed, text=f"{f.text}; {tail}"))
    return out


def best(verdicts: Sequence[VariantVerdict]) -> str | None:
    """The variant shown better than the baseline with the largest gain; None when no variant is shown better."""
    winners = [v for v in verdicts if v.better]
    return max(winners, key=lambda v: v.gain).name if winners else None
