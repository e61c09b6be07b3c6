"""Kernel Inception Distance: unbiased MMD^2 between two feature sets, averaged over random subsets.

FID at a few hundred samples is biased, and biased differently for different generators; below 2,048 samples
(the feature dimension) its covariance is rank-deficient. KID (Binkowski et al. 2018) is the unbiased MMD^2 with
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, so its expectation does not depend on the sample count.
As in clean-fid (`cleanfid.fid.kernel_distance`) and stylegan2-ada (`metrics/kernel_inception_distance.py`) it
is averaged over `num_subsets` subsets of at most `max_subset_size` samples per side, drawn without replacement;
with the same subsets drawn it gives clean-fid's value.

The standard error returned is that of the mean over subsets (sd over subsets / sqrt(num_subsets)). It measures
the subset sampling only: subsets of one pool overlap, so when the pool is not much larger than a subset it
understates the sampling error of the features themselves (with both pools no larger than max_subset_size every
subset is the whole pool and it is 0).
"""

from __future__ import annotations

import math

import numpy as np

_CACHE_ENTRIES = 8192 ** 2  # the joint kernel matrix is computed once when it has at most this many entries (512 MB)


def _subset_terms_cached(x: np.ndarray, y: np.ndarray, subsets: list[tuple[np.ndarray, np.ndarray]],
                         m: int) -> np.ndarray:
    # One kernel matrix over both pools; a subset's kernel sums are u' K v for its 0/1 indicator vectors u, v,
    # so all subsets take two matrix products instead of three m x m x d products each.
    z = np.concatenate([x, y])
    kernel = z @ z.T
    kernel /= z.shape[1]
    kernel += 1
    kernel **= 3
    ux = np.zeros((len(z), len(subsets)))
    uy = np.zeros((len(z), len(subsets)))
    for j, (ix, iy) in enumerate(subsets):
        ux[ix, j] = 1
        uy[len(x) + iy, j] = 1
    kux, kuy = kernel @ ux, kernel @ uy
    diag = np.diag(kernel)
    within = (ux * kux).sum(0) + (uy * kuy).sum(0) - diag @ ux - diag @ uy
    across = (ux * kuy).sum(0)
    return within / (m - 1) - across * 2 / m


def _subset_terms_direct(x: np.ndarray, y: np.ndarray, subsets: list[tuple[np.ndarray, np.ndarray]],
                         m: int) -> np.ndarray:
    d = x.shape[1]
    terms = np.empty(len(subsets))
    for j, (ix, iy) in enumerate(subsets):
        xs, ys = x[ix], y[iy]
        a = (xs @ xs.T / d + 1) ** 3 + (ys @ ys.T / d + 1) ** 3
        b = (xs @ ys.T / d + 1) ** 3
        terms[j] = (a.sum() - np.trace(a)) / (m - 1) - b.sum() * 2 / m
    return terms


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Unbiased KID (cubic polynomial kernel) over random subsets, as clean-fid computes it: (mean, std error)."""
    y = np.asarray(feats1, dtype=np.float64)
    x = np.asarray(feats2, dtype=np.float64)
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
    terms = (_subset_terms_cached if cached else _subset_terms_direct)(x, y, subsets, m) / m
    std_error = float(terms.std(ddof=1) / math.sqrt(num_subsets)) if num_subsets > 1 else math.nan
    return float(terms.mean()), std_error
