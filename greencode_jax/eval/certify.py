"""Thresholds certified with Learn-then-Test (Angelopoulos et al.; CALM's calibration).

On a calibration set of n samples, disjoint from the test set, each candidate threshold λ_j
has a per-sample loss in [0, 1] (how much worse than the full model that sample came out).
For the hypothesis H_j: E[L(λ_j)] > δ, a Hoeffding–Bentkus p-value is computed from the
empirical risk; the candidates are walked from the most conservative (never exits) to the most
aggressive, rejecting H_j while p_j ≤ ε, and the last rejected one is certified: with
probability at least 1 − ε over the draw of the calibration set, its expected loss is at most
δ. If the first candidate is not rejected, no threshold is certified (never exit).

Fixed-sequence testing needs no multiple-testing correction: the order is fixed before the
data is seen and testing stops at the first failure.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.stats import binom

from greencode_jax.config import check_levels
from greencode_jax.errors import GreencodeError

BOUNDS = ("hoeffding_bentkus", "hoeffding")


def _kl_bernoulli(a: float, b: float) -> float:
    """h(a, b) = a ln(a/b) + (1 − a) ln((1 − a)/(1 − b)), with 0 ln 0 = 0."""
    first = 0.0 if a <= 0 else a * math.log(a / b)
    second = 0.0 if a >= 1 else (1 - a) * math.log((1 - a) / (1 - b))
    return first + second


def hoeffding_pvalue(risk: float, n: int, delta: float) -> float:
    """exp(−2n · max(0, δ − R̂)²)."""
    return math.exp(-2.0 * n * max(0.0, delta - risk) ** 2)


def hoeffding_bentkus_pvalue(risk: float, n: int, delta: float) -> float:
    """min(exp(−n · h(min(R̂, δ), δ)), e · P(Binomial(n, δ) ≤ ⌈n R̂⌉))."""
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk, delta), delta))
    bentkus = math.e * float(binom.cdf(math.ceil(n * risk - 1e-12), n, delta))
    return min(1.0, hoeffding, bentkus)


def min_samples(delta: float, epsilon: float, bound: str = "hoeffding_bentkus") -> int:
    """The fewest calibration samples with which a candidate of empirical risk 0 is rejected:
    with fewer, not even a threshold that never loses anything can be certified."""
    pvalue = PVALUES[bound]
    n = 1
    while pvalue(0.0, n, delta) > epsilon:
        n *= 2
    low, high = n // 2, n  # p-value falls with n: the first n in (low, high] that passes
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if pvalue(0.0, mid, delta) > epsilon else (low, mid)
    return high


PVALUES = {"hoeffding_bentkus": hoeffding_bentkus_pvalue, "hoeffding": hoeffding_pvalue}


@dataclasses.dataclass(frozen=True)
class Certification:
    delta: float
    epsilon: float
    n: int
    bound: str
    thresholds: tuple  # candidates, most conservative first
    risks: tuple  # empirical mean loss of each
    p_values: tuple  # None past the first failure (not tested)
    certified: float | None  # the last rejected candidate; None: none (never exit)

    def to_dict(self) -> dict:
        return {"delta": self.delta, "epsilon": self.epsilon, "n": self.n, "bound": self.bound,
                "certified": self.certified,
                "candidates": [{"threshold": t, "risk": r, "p_value": p,
                                "rejected": p is not None and p <= self.epsilon}
                               for t, r, p in zip(self.thresholds, self.risks, self.p_values)]}


def fixed_sequence(thresholds, losses, delta: float, epsilon: float, bound: str = "hoeffding_bentkus"
                   ) -> Certification:
    """Learn-then-Test over `thresholds` (most conservative first) with per-sample `losses`
    [len(thresholds), n] in [0, 1]."""
    check_levels(delta, epsilon)
    if bound not in PVALUES:
        raise GreencodeError(f"certify.bound={bound!r}: expected one of {BOUNDS}")
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] != len(thresholds) or losses.shape[1] == 0:
        raise GreencodeError(f"losses of shape {list(losses.shape)}: expected [{len(thresholds)} thresholds, "
                             "n samples]")
    if not np.all(np.isfinite(losses)) or losses.min() < 0 or losses.max() > 1:
        raise GreencodeError("per-sample losses must lie in [0, 1]")
    n = losses.shape[1]
    needed = min_samples(delta, epsilon, bound)
    if n < needed:
        raise GreencodeError(f"{n} calibration samples cannot certify any threshold at delta={delta:g}, "
                             f"epsilon={epsilon:g}: the {bound.replace('_', '-')} bound needs at least {needed} "
                             "(a larger calibration split, or a larger delta)")
    risks = tuple(float(r) for r in losses.mean(axis=1))
    p_values, certified = [], None
    for threshold, risk in zip(thresholds, risks):
        p = PVALUES[bound](risk, n, delta)
        p_values.append(p)
        if p > epsilon:
            break
        certified = threshold
    p_values += [None] * (len(thresholds) - len(p_values))
    return Certification(float(delta), float(epsilon), n, bound, tuple(float(t) for t in thresholds), risks,
                         tuple(p_values), None if certified is None else float(certified))
