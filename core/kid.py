"""Kernel Inception Distance: unbiased MMD^2 between two feature sets, averaged over random subsets.

FID at a few hundred samples is biased, and biased differently for different generators; below 2,048 samples
(the feature dimension) its covariance is rank-deficient. KID (Binkowski et al. 2018) is the unbiased MMD^2 with
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, so its expectation does not depend on the sample count.
As in clean-fid (`cleanfid.fid.kernel_distance`) and stylegan2-ada (`metrics/kernel_inception_distance.py`) it
is averaged over `num_subsets` subsets of at most `max_subset_size` samples per side, drawn without replacement;
with the same subsets drawn it gives clean-fid's value.

Its standard error. clean-fid and stylegan quote the spread over subsets / sqrt(num_subsets), which measures
only which subsets were drawn: subsets of one pool overlap, and when both pools are no larger than a subset
every subset is the whole pool and that error is 0, however few samples there are. `estimate` adds the
sampling error of the features themselves: a delete-one jackknife over both pools (Arvesen's two-sample
jackknife, subsets held fixed), cheap because deleting one sample changes a subset's kernel sums by one row
sum. Its variance is the jackknife's plus the subsets', so with small pools it is the jackknife alone.
By the Efron-Stein inequality the jackknife variance errs on the large side, never the small one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_CACHE_ENTRIES = 8192 ** 2  # the joint kernel matrix is computed once when it has at most this many entries (512 MB)


@dataclass(frozen=True)
class KidEstimate:
    value: float  # mean unbiased MMD^2 over the subsets: clean-fid's KID
    std_error: float  # sqrt(jackknife^2 + subset^2): the value's sampling error; NaN below 3 samples a side
    subset_std_error: float  # sd over subsets / sqrt(num_subsets), clean-fid's and stylegan's (subsets only)
    jackknife_std_error: float  # delete-one jackknife over both pools, subsets held fixed
    subset_size: int  # samples per side in each subset
    num_subsets: int


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = a @ b.T
    k /= a.shape[1]
    k += 1
    k **= 3
    return k


def _terms(a_x, a_y, b, m: int):
    """A subset's unbiased MMD^2 from its kernel sums (within x, within y off the diagonal; across)."""
    return (a_x + a_y) / (m * (m - 1)) - 2 * b / (m * m)


def _dropped(a_own, a_other, b, row_own, row_across, m: int):
    """A subset's MMD^2 minus its full value, with one sample of one side deleted (m - 1 against m)."""
    if m < 3:
        return np.full(np.shape(row_own), np.nan)
    less = ((a_own - 2 * row_own) / ((m - 1) * (m - 2)) + a_other / (m * (m - 1))
            - 2 * (b - row_across) / ((m - 1) * m))
    return less - _terms(a_own, a_other, b, m)


def _cached(x, y, subsets, m):
    # One kernel matrix over both pools; a subset's kernel sums are u' K v for its 0/1 indicator vectors u, v,
    # so all subsets take two matrix products instead of three m x m x d products each. Row j of K u is
    # sample j's kernel sum over the subset: what deleting it takes away.
    z = np.concatenate([x, y]).astype(np.float64)
    kernel = _kernel(z, z)
    ux = np.zeros((len(z), len(subsets)))
    uy = np.zeros((len(z), len(subsets)))
    for j, (ix, iy) in enumerate(subsets):
        ux[ix, j] = 1
        uy[len(x) + iy, j] = 1
    kux, kuy = kernel @ ux, kernel @ uy
    diag = np.diag(kernel)
    a_x = (ux * kux).sum(0) - diag @ ux
    a_y = (uy * kuy).sum(0) - diag @ uy
    b = (ux * kuy).sum(0)
    own = diag[:, None]
    drop_x = ux * _dropped(a_x, a_y, b, kux - own, kuy, m)
    drop_y = uy * _dropped(a_y, a_x, b, kuy - own, kux, m)
    return _terms(a_x, a_y, b, m), drop_x[:len(x)].sum(1), drop_y[len(x):].sum(1)


def _direct(x, y, subsets, m):
    terms = np.empty(len(subsets))
    drop_x, drop_y = np.zeros(len(x)), np.zeros(len(y))
    for j, (ix, iy) in enumerate(subsets):
        xs, ys = x[ix].astype(np.float64), y[iy].astype(np.float64)  # pools may be float32 memory maps
        kxx, kyy, kxy = _kernel(xs, xs), _kernel(ys, ys), _kernel(xs, ys)
        dx, dy = np.diag(kxx), np.diag(kyy)
        a_x, a_y, b = kxx.sum() - dx.sum(), kyy.sum() - dy.sum(), kxy.sum()
        terms[j] = _terms(a_x, a_y, b, m)
        np.add.at(drop_x, ix, _dropped(a_x, a_y, b, kxx.sum(1) - dx, kxy.sum(1), m))
        np.add.at(drop_y, iy, _dropped(a_y, a_x, b, kyy.sum(1) - dy, kxy.sum(0), m))
    return terms, drop_x, drop_y


def _jackknife_var(shifts: np.ndarray) -> float:
    """(n-1)/n sum (U_-i - mean U_-.)^2, from the leave-one-out changes U_-i - U."""
    n = len(shifts)
    return float((n - 1) / n * ((shifts - shifts.mean()) ** 2).sum())


def estimate(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
             seed: int = 0) -> KidEstimate:
    """Unbiased KID (cubic kernel) over random subsets as clean-fid draws them, with its standard errors.

    feats1 is clean-fid's first argument (the reference), feats2 the second (the generated samples).
    """
    y, x = feats1, feats2
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (n, d) feature arrays with the same d, got {y.shape} and {x.shape}")
    m = min(len(x), len(y), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per side, got {len(y)} and {len(x)}")
    rng = np.random.default_rng(seed)
    # clean-fid's order: per subset, first the feats2 indices, then the feats1 indices
    subsets = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False))
               for _ in range(num_subsets)]
    n = len(x) + len(y)
    cheaper = n * n * (x.shape[1] / 2 + 2 * num_subsets) <= 2 * num_subsets * m * m * x.shape[1]
    cached = n * n <= _CACHE_ENTRIES and cheaper
    terms, drop_x, drop_y = (_cached if cached else _direct)(x, y, subsets, m)
    subset_se = float(terms.std(ddof=1) / math.sqrt(num_subsets)) if num_subsets > 1 else math.nan
    # the estimate is the mean over subsets, so a deletion moves it by the mean of its subsets' changes
    jack_var = _jackknife_var(drop_x / num_subsets) + _jackknife_var(drop_y / num_subsets)
    se = math.sqrt(jack_var + (subset_se ** 2 if num_subsets > 1 else 0.0))
    return KidEstimate(float(terms.mean()), se, subset_se, math.sqrt(jack_var), m, num_subsets)


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """clean-fid's KID and its subset standard error (sd over subsets / sqrt(num_subsets)): (mean, std error)."""
    e = estimate(np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64), num_subsets,
                 max_subset_size, seed)
    return e.value, e.subset_std_error
