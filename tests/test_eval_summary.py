"""eval.stats (bootstrap interval, Pareto front) on cases with known answers, and eval.summary."""

from __future__ import annotations

import json
import math
from math import comb

import numpy as np
import pytest

from eval_helpers import family_records, record
from greencode_jax.eval.stats import bootstrap_ci, pareto_front
from greencode_jax.eval.summary import policy_keys, summarize

# bootstrap_ci


def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([0.25] * 40) == (0.25, 0.25, 0.25)
    assert bootstrap_ci([7.0]) == (7.0, 7.0, 7.0)


def test_none_and_nan_are_dropped_and_nothing_left_is_nan():
    assert bootstrap_ci([None, math.nan, 3.0, None]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_ci([None, math.nan]))
    mean, low, high = bootstrap_ci([1.0, None, 0.0, math.nan, 1.0, 0.0])
    assert mean == 0.5 and low < 0.5 < high


def binomial_quantile(n: int, p: float, q: float) -> int:
    """Smallest k with P(Binomial(n, p) <= k) >= q."""
    total = 0.0
    for k in range(n + 1):
        total += comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bootstrap_of_a_proportion_has_the_binomial_answer(seed):
    """6 ones in 20: a resample's mean is Binomial(20, 0.3) / 20 exactly, whose 2.5 % and 97.5 %
    quantiles are 2/20 and 10/20 (CDF 0.0076 | 0.0355 at 1 | 2 and 0.952 | 0.983 at 9 | 10).
    2000 resamples put the empirical quantiles on those atoms: the counts below each boundary
    are 4.5+ binomial standard deviations from the 2.5 % / 97.5 % marks."""
    values = [1.0] * 6 + [0.0] * 14
    lo_k, hi_k = binomial_quantile(20, 0.3, 0.025), binomial_quantile(20, 0.3, 0.975)
    assert (lo_k, hi_k) == (2, 10)
    assert bootstrap_ci(values, seed=seed) == pytest.approx((0.3, lo_k / 20, hi_k / 20), abs=1e-12)


def test_bootstrap_of_a_normal_mean_matches_the_analytic_interval():
    """n = 4000 draws of N(0, 1): the bootstrap distribution of the mean is close to
    N(xbar, s^2 / n), so the 95 % ends should sit at xbar -/+ 1.96 s / sqrt(n). The Monte Carlo
    error of a 2.5 % quantile from B = 2000 resamples is sqrt(q (1 - q) / B) / phi(1.96) =
    0.060 standard errors; the tolerance, 0.25 standard errors, is four of those."""
    x = np.random.default_rng(123).normal(size=4000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    mean, low, high = bootstrap_ci(x, seed=7)
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert abs(low - (x.mean() - 1.959964 * se)) < 0.25 * se
    assert abs(high - (x.mean() + 1.959964 * se)) < 0.25 * se
    # a 50 % interval is 0.6745 / 1.96 as wide
    _, low50, high50 = bootstrap_ci(x, confidence=0.5, seed=7)
    assert (high50 - low50) == pytest.approx(2 * 0.674490 * se, abs=0.25 * se)


def test_bootstrap_is_reproducible_and_chunks_large_inputs_the_same_way():
    x = np.random.default_rng(5).random(3000)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(list(x), seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)


def test_bootstrap_rejects_a_bad_confidence():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)


# pareto_front


def test_pareto_front_on_hand_made_points():
    costs = [1.0, 2.0, 3.0, 2.0, 4.0, 1.0, None, 5.0]
    quality = [0.1, 0.5, 0.4, 0.5, 0.9, 0.05, 1.0, 0.9]
    # 0: cheapest with the best quality at cost 1 -> front
    # 1, 3: equal points (2, 0.5): neither dominates the other -> both on the front
    # 2: (3, 0.4) dominated by (2, 0.5); 5: (1, 0.05) dominated by (1, 0.1) (equal cost, lower quality)
    # 4: (4, 0.9) front; 6: no cost -> never; 7: (5, 0.9) dominated by (4, 0.9) (equal quality, higher cost)
    assert pareto_front(costs, quality) == [True, True, False, True, True, False, False, False]
    assert pareto_front([], []) == []
    assert pareto_front([3.0], [0.0]) == [True]


# summarize


def by_key(summary, protocol="completion"):
    return summary["protocols"][protocol]["policies"]


def test_summary_means_and_intervals_agree_with_numpy_and_bootstrap():
    records = family_records(n=8)
    summary = summarize(records)
    json.dumps(summary, allow_nan=False)  # plain JSON: no NaN, no numpy types
    policies = by_key(summary)
    assert list(policies) == ["full", "fixed:3", "fixed:5", "confidence:softmax_max@0.9", "learned@0.6",
                              "learned@0.9"]
    rows = [r for r in records if r["policy"] == "fixed:5"]
    p = policies["fixed:5"]
    assert (p["family"], p["setting"], p["batch_size"], p["n"]) == ("fixed", 5, 1, 8)
    for name in ("rouge_l", "bleu", "codebleu", "edit_similarity"):
        values = [r["metrics"][name] for r in rows]
        mean, low, high = bootstrap_ci(values)
        assert p["metrics"][name] == {"mean": mean, "low": low, "high": high}
        assert mean == pytest.approx(np.mean(values))
    assert p["seconds"]["mean"] == pytest.approx(np.mean([r["seconds"] for r in rows]))
    assert p["tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows))
    assert p["mean_exit_layer"]["mean"] == 5.0 and p["layers_computed"]["mean"] == 6.0


def test_measured_and_modelled_are_never_summed_or_mixed():
    records = [record(s, "full", "full", None, rouge_l=0.5, measured=10.0, modelled=1.0) for s in range(4)]
    energy = by_key(summarize(records))["full"]["energy"]
    assert energy["measured"]["mean"] == 10.0 and energy["measured"]["method"] == "counter"
    assert energy["modelled"]["mean"] == 1.0 and energy["modelled"]["method"] == "measured"
    for figure in energy.values():  # neither 11 (summed) nor 5.5 (averaged together)
        assert figure["mean"] not in (11.0, 5.5)
        assert figure["low"] == figure["high"] == figure["mean"]


def test_a_missing_measurement_is_none_with_its_reason_never_zero():
    reason = "no energy counter on this device"
    records = [record(s, "full", "full", None, rouge_l=0.5, measured=None, measured_method="unavailable",
                      measured_reason=reason, modelled=2.0) for s in range(3)]
    records += [record(s, "fixed:3", "fixed", 3, rouge_l=0.3, measured=None, measured_method="unavailable",
                       measured_reason=reason, modelled=1.0) for s in range(3)]
    summary = summarize(records)
    for p in by_key(summary).values():
        measured = p["energy"]["measured"]
        assert measured["mean"] is None and measured["reason"] == reason
        assert "low" not in measured
        assert p["saved_vs_full"]["measured"] is None
    assert by_key(summary)["fixed:3"]["saved_vs_full"]["modelled"] == pytest.approx(50.0)
    assert summary["protocols"]["completion"]["pareto_cost"] == "modelled"


def test_a_partial_measurement_counts_only_the_measured_samples_and_says_so():
    records = [record(0, "full", "full", None, rouge_l=0.5, measured=4.0),
               record(1, "full", "full", None, rouge_l=0.5, measured=6.0),
               record(2, "full", "full", None, rouge_l=0.5, measured=None, measured_method="unavailable",
                      measured_reason="window too short")]
    measured = by_key(summarize(records))["full"]["energy"]["measured"]
    assert measured["mean"] == 5.0 and measured["n"] == 2 and measured["missing"] == 1
    assert "1 of 3 samples" in measured["reason"] and "window too short" in measured["reason"]


def test_two_measurement_methods_in_one_policy_are_both_named():
    records = [record(0, "full", "full", None, rouge_l=0.5, measured=4.0, measured_method="counter"),
               record(1, "full", "full", None, rouge_l=0.5, measured=6.0, measured_method="estimated")]
    assert by_key(summarize(records))["full"]["energy"]["measured"]["method"] == "counter+estimated"


def test_saved_and_quality_change_against_full_by_hand():
    policies = by_key(summarize(family_records(n=5)))
    # family_records' levels: full 8 J modelled / 10 J measured / ROUGE-L 0.6; learned@0.9 7 / 9 / 0.58
    p = policies["learned@0.9"]
    assert p["saved_vs_full"]["modelled"] == pytest.approx(100 * (1 - 7 / 8))
    assert p["saved_vs_full"]["measured"] == pytest.approx(100 * (1 - 9 / 10))
    assert p["quality_change_vs_full"] == pytest.approx(100 * (0.58 / 0.6 - 1))
    assert p["full_reference"] == "full"
    assert policies["full"]["saved_vs_full"] == {"measured": 0.0, "modelled": 0.0}


def test_pareto_flags_follow_modelled_energy_and_rouge():
    records = family_records(n=4)
    for r in records:  # make the confidence row cost as much as learned@0.9 for less ROUGE-L
        if r["family"] == "confidence":
            r["energy"]["modelled"]["joules"] = 7.0
    summary = summarize(records)
    assert summary["protocols"]["completion"]["pareto_cost"] == "modelled"
    flags = {k: p["pareto"] for k, p in by_key(summary).items()}
    assert flags == {"full": True, "fixed:3": True, "fixed:5": True, "confidence:softmax_max@0.9": False,
                     "learned@0.6": True, "learned@0.9": True}


def test_pareto_uses_measured_when_a_policy_lacks_modelled_joules():
    records = family_records(n=3)
    for r in records:
        if r["policy"] == "fixed:3":
            r["energy"]["modelled"] = {"joules": None, "method": "unavailable"}
    summary = summarize(records)
    assert summary["protocols"]["completion"]["pareto_cost"] == "measured"
    assert by_key(summary)["fixed:3"]["energy"]["modelled"]["mean"] is None
    assert by_key(summary)["fixed:3"]["pareto"] is True  # the cheapest measured row


def test_saved_compares_with_full_of_the_same_batch_size_and_labels_stay_apart():
    records = [record(s, "full", "full", None, rouge_l=0.6, modelled=8.0, batch_size=1) for s in range(3)]
    records += [record(s, "full", "full", None, rouge_l=0.6, modelled=4.0, batch_size=4) for s in range(3)]
    records += [record(s, "learned@0.9", "learned", 0.9, rouge_l=0.5, modelled=2.0, batch_size=4)
                for s in range(3)]
    keys = policy_keys(records)
    assert set(keys) == {"full (batch 1)", "full (batch 4)", "learned@0.9"}
    policies = by_key(summarize(records))
    assert policies["learned@0.9"]["saved_vs_full"]["modelled"] == pytest.approx(50.0)  # vs 4 J, not 8 J
    assert policies["learned@0.9"]["full_reference"] == "full"
    assert policies["full (batch 4)"]["batch_size"] == 4


def test_a_metric_no_record_has_is_none_and_the_summary_says_why():
    records = [record(s, "full", "full", None, rouge_l=0.5, codebleu=None) for s in range(3)]
    summary = summarize(records)
    assert by_key(summary)["full"]["metrics"]["codebleu"] is None
    assert "codebleu" in summary["unavailable"]
    assert by_key(summary)["full"]["metrics"]["chrf"] == {"mean": 50.0, "low": 50.0, "high": 50.0}


def test_protocols_are_summarised_apart():
    records = family_records(n=3) + family_records(n=5, protocol="line")
    summary = summarize(records)
    assert set(summary["protocols"]) == {"completion", "line"}
    assert by_key(summary, "line")["full"]["n"] == 5 and by_key(summary)["full"]["n"] == 3


def test_corpus_scores_appear_with_a_language():
    records = family_records(n=3)
    assert "corpus" not in by_key(summarize(records))["full"]
    corpus = by_key(summarize(records, lang="python"))["full"]["corpus"]
    assert set(corpus) == {"bleu", "chrf", "codebleu"}


def test_records_that_disagree_on_a_policy_are_refused():
    records = [record(0, "full", "full", None, rouge_l=0.5), record(1, "full", "fixed", 3, rouge_l=0.5)]
    with pytest.raises(ValueError, match="disagree on family"):
        summarize(records)


def test_a_record_without_a_modelled_figure_reads_as_missing_not_zero():
    r = record(0, "full", "full", None, rouge_l=0.5)
    del r["energy"]["modelled"]
    modelled = by_key(summarize([r]))["full"]["energy"]["modelled"]
    assert modelled == {"mean": None, "reason": "no modelled figure recorded"}
