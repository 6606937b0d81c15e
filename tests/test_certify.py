"""Learn-then-Test: the p-values against hand-computed ones, and the guarantee itself, checked by
Monte Carlo on synthetic losses whose true means are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from greencode_jax.errors import GreencodeError
from greencode_jax.eval.certify import (
    fixed_sequence, hoeffding_bentkus_pvalue, hoeffding_pvalue, min_samples,
)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k) by direct summation: an independent reference for scipy's."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


@pytest.mark.parametrize("risk, n, delta", [(0.0, 50, 0.1), (0.03, 200, 0.1), (0.1, 100, 0.1), (0.2, 80, 0.1),
                                            (0.05, 400, 0.08)])
def test_hoeffding_bentkus_by_hand(risk, n, delta):
    a = min(risk, delta)
    h = (a * math.log(a / delta) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - delta))
    expected = min(1.0, math.exp(-n * h), math.e * binomial_cdf(math.ceil(n * risk), n, delta))
    assert hoeffding_bentkus_pvalue(risk, n, delta) == pytest.approx(expected, rel=1e-9)
    assert hoeffding_pvalue(risk, n, delta) == pytest.approx(math.exp(-2 * n * max(0, delta - risk) ** 2))
    assert hoeffding_bentkus_pvalue(risk, n, delta) <= hoeffding_pvalue(risk, n, delta) + 1e-12


def test_min_samples_is_the_smallest_n_that_rejects_a_lossless_candidate():
    for delta, epsilon in ((0.1, 0.1), (0.05, 0.1), (0.01, 0.05)):
        n = min_samples(delta, epsilon)
        assert (1 - delta) ** n <= epsilon < (1 - delta) ** (n - 1)  # HB at risk 0 is (1 - delta)^n
        assert n == math.ceil(math.log(epsilon) / math.log(1 - delta))


def test_too_few_samples_is_one_error_naming_the_n_needed():
    losses = np.zeros((3, 10))
    with pytest.raises(GreencodeError, match=r"10 calibration samples cannot certify .* needs at least 22"):
        fixed_sequence([1.0, 0.9, 0.8], losses, delta=0.1, epsilon=0.1)


@pytest.mark.parametrize("delta, epsilon", [(0.0, 0.1), (1.0, 0.1), (0.1, 0.0), (0.1, 1.5), (float("nan"), 0.1)])
def test_levels_outside_0_1_are_refused(delta, epsilon):
    with pytest.raises(GreencodeError, match=r"certify\.(delta|epsilon)=.*strictly between 0 and 1"):
        fixed_sequence([1.0], np.zeros((1, 100)), delta=delta, epsilon=epsilon)


def test_fixed_sequence_stops_at_the_first_failure():
    rng = np.random.default_rng(0)
    n = 400
    means = [0.0, 0.01, 0.02, 0.3, 0.0]  # the last is cheap again, but testing stopped before it
    losses = np.stack([rng.random(n) < m for m in means]).astype(float)
    result = fixed_sequence([1.0, 0.9, 0.8, 0.7, 0.6], losses, delta=0.1, epsilon=0.1)
    assert result.certified == 0.8
    assert result.p_values[3] > 0.1 and result.p_values[4] is None
    assert [c["rejected"] for c in result.to_dict()["candidates"]] == [True, True, True, False, False]


def test_the_guarantee_holds_over_many_calibration_draws():
    """Nested losses (a more aggressive threshold loses wherever a more conservative one does)
    with known true means: the certified threshold's true mean exceeds delta in at most epsilon
    of the draws. Monte Carlo slack: 3 standard errors of a proportion epsilon over the draws."""
    rng = np.random.default_rng(1)
    means = np.linspace(0.0, 0.3, 16)
    thresholds = list(np.linspace(1.0, 0.25, 16))
    delta, epsilon, n, draws = 0.1, 0.1, 300, 1000
    violations, certified_means = 0, []
    for _ in range(draws):
        u = rng.random(n)
        losses = (u[None, :] < means[:, None]).astype(float)
        result = fixed_sequence(thresholds, losses, delta=delta, epsilon=epsilon)
        true_mean = 0.0 if result.certified is None else means[thresholds.index(result.certified)]
        violations += true_mean > delta
        certified_means.append(true_mean)
    slack = 3 * math.sqrt(epsilon * (1 - epsilon) / draws)
    assert violations / draws <= epsilon + slack
    # and it is not vacuous: the certified threshold usually gets within a few candidates of delta
    assert np.median(certified_means) >= 0.06
