"""Accuracy metrics for output-length predictions. numpy only (no scipy).

- mae: mean |pred - actual| (tokens).
- median_relative_error: median of |pred - actual| / max(actual, 1).
- kendall_tau: Kendall's tau-b between predictions and actual lengths (ties handled as scipy's
  `kendalltau(variant="b")`): what a scheduler ordering requests by prediction cares about.
  O(n log n): sort by x, count discordant pairs with a Fenwick tree over y ranks (Knight 1966;
  the same algorithm as scipy.stats.kendalltau).
- bucket_accuracy: share of requests whose prediction lands in the actual length's log2 bucket
  (floor(log2(max(n, 1)))): [1], [2, 3], [4, 7], ...
- coverage: share of actual lengths inside [p10, p90] (an honest 80 % interval covers ~0.8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mae(pred: Sequence[float], actual: Sequence[float]) -> float:
    p, a = np.asarray(pred, float), np.asarray(actual, float)
    return float(np.mean(np.abs(p - a))) if a.size else math.nan


def median_relative_error(pred: Sequence[float], actual: Sequence[float]) -> float:
    p, a = np.asarray(pred, float), np.asarray(actual, float)
    return float(np.median(np.abs(p - a) / np.maximum(a, 1.0))) if a.size else math.nan


def log2_bucket(x: np.ndarray) -> np.ndarray:
    return np.floor(np.log2(np.maximum(np.asarray(x, float), 1.0))).astype(np.int64)


def bucket_accuracy(pred: Sequence[float], actual: Sequence[float]) -> float:
    a = np.asarray(actual, float)
    return float(np.mean(log2_bucket(pred) == log2_bucket(a))) if a.size else math.nan


def coverage(p10: Sequence[float], p90: Sequence[float], actual: Sequence[float]) -> float:
    a = np.asarray(actual, float)
    if not a.size:
        return math.nan
    return float(np.mean((np.asarray(p10, float) <= a) & (a <= np.asarray(p90, float))))


def _dense_ranks(v: np.ndarray) -> np.ndarray:
    """1-based dense ranks of v (equal values, equal rank)."""
    s = np.sort(v)
    uniq = s[np.concatenate(([True], s[1:] != s[:-1]))]
    return np.searchsorted(uniq, v) + 1


def _tied_pairs(ranks: np.ndarray) -> int:
    cnt = np.bincount(ranks)
    cnt = cnt[cnt > 1].astype(np.int64)
    return int((cnt * (cnt - 1) // 2).sum())


def _discordant(x: np.ndarray, y: np.ndarray) -> int:
    """Pairs with x_i < x_j and y_i > y_j; x sorted ascending, y dense ranks 1..m."""
    size = len(y)
    tree = [0] * (int(y.max()) + 1)
    top = len(tree)
    xs, ys = x.tolist(), y.tolist()
    dis = 0
    i = k = 0
    while i < size:
        # the run of equal x starting at i: count earlier (smaller-x) elements with larger y
        while k < size and xs[k] == xs[i]:
            dis += i
            j = ys[k]
            while j:
                dis -= tree[j]
                j &= j - 1
            k += 1
        while i < k:  # then add the run to the tree
            j = ys[i]
            while j < top:
                tree[j] += 1
                j += j & -j
            i += 1
    return dis


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of x and y; nan when fewer than 2 points or either side is constant."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.shape} and {ya.shape}")
    n = xa.size
    if n < 2:
        return math.nan
    xr, yr = _dense_ranks(xa), _dense_ranks(ya)
    order = np.lexsort((yr, xr))  # by x, then y
    xr, yr = xr[order], yr[order]
    dis = _discordant(xr, yr)
    change = np.concatenate(([True], (xr[1:] != xr[:-1]) | (yr[1:] != yr[:-1]), [True]))
    runs = np.diff(np.flatnonzero(change)).astype(np.int64)
    both = int((runs * (runs - 1) // 2).sum())  # pairs tied in x and y
    xtie, ytie = _tied_pairs(xr), _tied_pairs(yr)
    tot = n * (n - 1) // 2
    if tot == xtie or tot == ytie:
        return math.nan
    concordant_minus_discordant = tot - xtie - ytie + both - 2 * dis
    tau = concordant_minus_discordant / math.sqrt((tot - xtie) * (tot - ytie))
    return float(min(1.0, max(-1.0, tau)))
