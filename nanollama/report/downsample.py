"""Thin long curves for the browser: min/max-preserving buckets, so spikes and the envelope survive.

A curve of n > max_points points is cut into max_points // 2 buckets of consecutive points; each
bucket keeps its minimum and its maximum (in x order), and the first and last points are always
kept. A loss spike or a grad-norm blow-up therefore stays visible, which plain striding would drop,
and a trace never has more than max_points + 2 points however long the run.
"""

from __future__ import annotations

import numpy as np

MAX_POINTS = 1000  # per trace: 100 runs x ~10 traces x 1000 points stays interactive


def minmax_indices(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Sorted indices of the points to keep (all of them when n <= max_points or max_points <= 0)."""
    y = np.asarray(y, float)
    n = len(y)
    if max_points <= 0 or n <= max_points:
        return np.arange(n)
    buckets = max(max_points // 2, 1)
    edges = np.linspace(0, n, buckets + 1).astype(int)  # bucket b holds [edges[b], edges[b+1])
    bucket = np.repeat(np.arange(buckets), np.diff(edges))
    # NaN (a missing value) must not win a bucket: it sorts as neither the minimum nor the maximum
    lo_key = np.where(np.isnan(y), np.inf, y)
    hi_key = np.where(np.isnan(y), -np.inf, y)
    order_lo = np.lexsort((lo_key, bucket))  # within each bucket, ascending
    order_hi = np.lexsort((-hi_key, bucket))  # within each bucket, descending
    starts = edges[:-1][np.diff(edges) > 0]  # buckets are contiguous: bucket b starts at sorted position edges[b]
    keep = np.concatenate([order_lo[starts], order_hi[starts], [0, n - 1]])
    return np.unique(keep)


def downsample(x, y, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) with at most max_points + 2 points, min/max per bucket kept (see the module docstring)."""
    x, y = np.asarray(x), np.asarray(y, float)
    idx = minmax_indices(y, max_points)
    return x[idx], y[idx]
