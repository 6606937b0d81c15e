"""Percentile-bootstrap confidence intervals of a mean, and the Pareto front of cost vs quality."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# Resampled values held at once: 2000 resamples of 1000 samples, in chunks for larger inputs.
_CHUNK = 2_000_000


def _finite(values: Iterable) -> np.ndarray:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray(kept, dtype=np.float64)


def bootstrap_ci(values, *, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and its percentile-bootstrap interval.

    None and NaN values are dropped first. `resamples` means of n values drawn with
    replacement (NumPy's default generator seeded with `seed`, so the interval is
    reproducible) give the interval's ends as their (1 - confidence)/2 and (1 + confidence)/2
    quantiles (NumPy's linear interpolation). One value, or n equal values, gives (v, v, v);
    no value gives three NaNs.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence}: expected a number between 0 and 1")
    if resamples < 1:
        raise ValueError(f"resamples {resamples}: expected at least 1")
    x = _finite(values)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.min() == x.max():  # one value, or all equal: every resample has this mean (rounding aside)
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, _CHUNK // n)
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return mean, float(low), float(high)


def pareto_front(costs: Sequence[float | None], qualities: Sequence[float | None]) -> list[bool]:
    """True for each point that no other point dominates: none has cost <= and quality >=
    with at least one of the two strict. Lower cost and higher quality are better; equal
    points do not dominate each other, so both stay on the front. A point whose cost or
    quality is None or NaN is never on the front and dominates nothing."""
    if len(costs) != len(qualities):
        raise ValueError(f"{len(costs)} costs but {len(qualities)} qualities")

    def usable(v):
        return v is not None and not math.isnan(float(v))

    points = [(float(c), float(q)) if usable(c) and usable(q) else None for c, q in zip(costs, qualities)]
    front = []
    for i, p in enumerate(points):
        if p is None:
            front.append(False)
            continue
        dominated = any(o is not None and j != i and o[0] <= p[0] and o[1] >= p[1] and (o[0] < p[0] or o[1] > p[1])
                        for j, o in enumerate(points))
        front.append(not dominated)
    return front
