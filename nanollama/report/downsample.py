"""Thin long curves for the browser: min/max-preserving buckets, so spikes and the envelope survive.

A curve of n > max_points points is cut into max_points // 2 buckets of ceil(n / buckets)
consecutive points; each bucket keeps its minimum and its maximum (in x order), and the first and
last points are always kept. A loss spike or a grad-norm blow-up therefore stays visible, which
plain striding would drop, and a trace never has more than max_points + 2 points however long the run.
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
    size = -(-n // buckets)  # equal buckets of `size` points, the last one padded: one reshape, no sort
    pad = buckets * size - n
    # NaN (a missing value) and the padding must not win a bucket: +inf never is a minimum, -inf never a maximum
    lo = np.concatenate([np.where(np.isnan(y), np.inf, y), np.full(pad, np.inf)]).reshape(buckets, size)
    hi = np.concatenate([np.where(np.isnan(y), -np.inf, y), np.full(pad, -np.inf)]).reshape(buckets, size)
    base = np.arange(buckets) * size
    keep = np.concatenate([base + lo.argmin(axis=1), base + hi.argmax(axis=1), [0, n - 1]])
    return np.unique(keep[keep < n])


def downsample(x, y, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) with at most max_points + 2 points, min/max per bucket kept (see the module docstring)."""
    x, y = np.asarray(x), np.asarray(y, float)
    idx = minmax_indices(y, max_points)
    return x[idx], y[idx]
