"""Per-layer cost model: the least-squares fit by hand, its refusals, and a workload under a real meter."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from greencode_jax.energy import CostSample, EnergyConfig, EnergyMeter, fit_cost_model, fit_line, window_measure
from greencode_jax.energy.devices import DeviceSpec
from greencode_jax.energy.result import DeviceReading, WindowResult
from greencode_jax.errors import GreencodeError


def test_fit_line_by_hand():
    # x = 1, 2, 3; y = 2, 4, 7. Mean x = 2, mean y = 13/3; Sxy = 5, Sxx = 2 -> b = 2.5, a = 13/3 - 5 = -2/3.
    a, b, r2, residuals = fit_line([1, 2, 3], [2, 4, 7])
    assert b == pytest.approx(2.5) and a == pytest.approx(-2 / 3)
    # Fitted 1.8333, 4.3333, 6.8333 -> residuals 1/6, -1/3, 1/6; SS_res = 1/6, SS_tot = 38/3.
    assert residuals == pytest.approx([1 / 6, -1 / 3, 1 / 6])
    assert r2 == pytest.approx(1 - (1 / 6) / (38 / 3))


def test_fit_cost_model_recovers_a_line_and_interleaves_depths():
    calls = []

    def measure(layers):
        calls.append(layers)
        return CostSample(layers, energy_j=(0.3 + 0.05 * layers) * 1000, tokens=1000, method="measured")

    model = fit_cost_model(measure, [1, 4, 8], repeats=2, workload="synthetic")
    assert calls == [1, 4, 8, 1, 4, 8]
    assert model.a_j == pytest.approx(0.3) and model.b_j_per_layer == pytest.approx(0.05)
    assert model.r2 == pytest.approx(1.0) and np.allclose(model.residuals, 0, atol=1e-12)
    assert model.predict(12) == pytest.approx(0.9) and model.method == "measured"
    data = model.to_dict()
    assert data["samples"][0]["joules_per_token"] == pytest.approx(0.35) and data["workload"] == "synthetic"


def test_fit_reports_noise_in_r2_and_residuals():
    noise = {1: 0.01, 2: -0.02, 3: 0.01, 4: 0.0}
    model = fit_cost_model(lambda n: CostSample(n, 1.0 + 0.5 * n + noise[n], 1, "estimated"), [1, 2, 3, 4])
    # By hand: y = 1.51, 1.98, 2.51, 3.00; mean x 2.5, mean y 2.25; Sxy = 2.5, Sxx = 5 -> b = 0.5, a = 1.0.
    # The noise is orthogonal to (1, x), so the residuals are exactly the noise;
    # SS_res = 0.0006, SS_tot = 0.5476 + 0.0729 + 0.0676 + 0.5625 = 1.2506.
    assert model.a_j == pytest.approx(1.0) and model.b_j_per_layer == pytest.approx(0.5)
    assert model.residuals == pytest.approx([0.01, -0.02, 0.01, 0.0], abs=1e-12)
    assert model.r2 == pytest.approx(1 - 0.0006 / 1.2506)
    assert model.method == "estimated" and model.warnings == []


def test_refusals_and_dropped_samples():
    with pytest.raises(GreencodeError, match="at least two different depths"):
        fit_cost_model(lambda n: CostSample(n, 1.0, 1, "measured"), [4, 4])
    with pytest.raises(GreencodeError, match="positive numbers of layers"):
        fit_cost_model(lambda n: CostSample(n, 1.0, 1, "measured"), [0, 2])
    with pytest.raises(GreencodeError, match="mix estimated and measured"):
        fit_cost_model(lambda n: CostSample(n, 1.0 * n, 1, "measured" if n < 3 else "estimated"), [1, 2, 3])
    lost = lambda n: CostSample(n, None if n == 2 else 2.0 * n, 1, "unavailable" if n == 2 else "measured",
                                note="counter went backwards")  # noqa: E731
    model = fit_cost_model(lost, [1, 2, 3])
    assert [s.layers for s in model.samples if s.energy_j is not None] == [1, 3]
    assert any("2 layers: sample dropped (counter went backwards)" in w for w in model.warnings)
    assert any("R² is 1 by construction" in w for w in model.warnings)
    with pytest.raises(GreencodeError, match="fewer than two depths"):
        fit_cost_model(lambda n: CostSample(n, None, 1, "unavailable", note="no counter"), [1, 2])


def reading(key, method, energy, backend):
    return DeviceReading({"key": key}, backend, method, "test", energy, 1.0)


def test_sample_from_window_keeps_measured_and_estimated_apart():
    window = WindowResult("w", 0.0, 1.0, [reading("gpu:0", "counter", 30.0, "nvml_counter"),
                                          reading("cpu:host", "estimated", 5.0, "cpu_time")])
    sample = CostSample.from_window(4, window, tokens=10)
    assert (sample.energy_j, sample.method, sample.devices) == (30.0, "measured", ("gpu:0",))
    assert sample.joules_per_token == pytest.approx(3.0)
    # The GPU failed this time: with the devices fixed up front the sample is dropped,
    # never silently replaced by the CPU estimate.
    failed = WindowResult("w", 0.0, 1.0, [reading("gpu:0", "unavailable", None, "nvml_counter"),
                                          reading("cpu:host", "estimated", 5.0, "cpu_time")])
    dropped = CostSample.from_window(4, failed, tokens=10, devices=["gpu:0"])
    assert dropped.energy_j is None and dropped.method == "unavailable" and "gpu:0" in dropped.note
    with pytest.raises(GreencodeError, match="mix measured and estimated"):
        CostSample.from_window(4, window, tokens=10, devices=["gpu:0", "cpu:host"])


def test_window_measure_runs_the_workload_under_the_meter():
    cpu = DeviceSpec("cpu", 0, "test CPU")
    ticks = iter(range(1000))
    steps = {}

    def workload(layers):
        x = jnp.ones((32, 32))

        def step():
            steps[layers] = steps.get(layers, 0) + 1
            y = x
            for _ in range(layers):
                y = jnp.tanh(y @ x)
            return y

        return step, 7

    with EnergyMeter(EnergyConfig(cpu_backend="estimate"), devices=[cpu]) as meter:
        # A fake clock advancing one second per call: the window repeats the step until 3 s pass.
        measure = window_measure(meter, workload, min_seconds=3.0, clock=lambda: next(ticks))
        sample = measure(2)
    assert steps[2] == 1 + 3  # one untimed warm-up call, then three timed steps
    assert sample.tokens == 3 * 7 and sample.method == "estimated" and sample.devices == ("cpu:host",)
    assert sample.energy_j is not None and sample.energy_j >= 0


# ---- the cost model with layers, head evaluations and decisions as separate terms ----------------------------------

def _samples(a, b, c, d, counts, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for layers, heads, decisions in counts:
        j = a + b * layers + c * heads + d * decisions + rng.normal(0, noise)
        out.append(CostSample(layers, j * 100, 100, "estimated", heads=heads, decisions=decisions, workload="w"))
    return out


# what calibration_workloads gives a 10-layer model with decisions after layers 2, 5 and 7 (3 rounds)
COUNTS = [(10, 1, 0), (3, 1, 1), (6, 1, 2), (8, 1, 3), (10, 4, 3), (10, 1, 3)] * 3


def test_fit_terms_recovers_each_price_against_numpy_least_squares():
    from greencode_jax.energy.calibrate import fit_terms

    samples = _samples(0.2, 0.01, 0.08, 0.002, COUNTS, noise=1e-4)
    fit = fit_terms(samples)
    design = np.array([[1, *c] for c in COUNTS], float)
    expected, *_ = np.linalg.lstsq(design, [s.joules_per_token for s in samples], rcond=None)
    np.testing.assert_allclose([fit.a_j, fit.b_j_per_layer, fit.c_j_per_head, fit.d_j_per_decision], expected,
                               rtol=1e-9, atol=1e-12)
    for name, truth in (("a_j", 0.2), ("b_j_per_layer", 0.01), ("c_j_per_head", 0.08), ("d_j_per_decision", 0.002)):
        low, high = fit.intervals[name]
        assert low <= truth <= high, (name, low, truth, high)
    assert fit.reliable and fit.r2 > 0.99 and fit.terms == ("layers", "heads", "decisions")
    assert fit.predict(10, 4, 3) == pytest.approx(0.2 + 0.1 + 0.32 + 0.006, abs=1e-3)


def test_the_intervals_cover_the_truth_at_their_level():
    """Over many noisy calibrations each 95 % interval holds the true price in about 95 % of them."""
    from greencode_jax.energy.calibrate import fit_terms

    hits, draws = 0, 400
    for seed in range(draws):
        fit = fit_terms(_samples(0.2, 0.01, 0.08, 0.002, COUNTS, noise=0.003, seed=seed))
        low, high = fit.intervals["c_j_per_head"]
        hits += low <= 0.08 <= high
    assert abs(hits / draws - 0.95) <= 3 * np.sqrt(0.95 * 0.05 / draws)


def test_a_fit_that_explains_little_is_marked_unreliable():
    from greencode_jax.energy.calibrate import fit_terms

    fit = fit_terms(_samples(0.2, 0.0001, 0.0, 0.0, COUNTS, noise=0.05, seed=3))
    assert not fit.reliable and any("unreliable" in w for w in fit.warnings)
    assert fit.to_dict()["reliable"] is False


def test_token_counts_by_policy_family():
    from greencode_jax.generate.costs import token_counts
    from greencode_jax.models import ModelConfig

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=10, num_heads=2, num_kv_heads=1,
                         head_dim=8, intermediate_size=32, max_position_embeddings=64, norm_eps=1e-5,
                         activation="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                         exit_layers=(2, 5, 7))
    assert token_counts(config, "full", 9) == token_counts(config, "base", 9) == (10, 1, 0)
    assert token_counts(config, "fixed", 5) == (6, 1, 2)
    assert token_counts(config, "learned", 2) == (3, 1, 1)
    assert token_counts(config, "learned", 9) == (10, 1, 3)  # never exited: every decision paid
    assert token_counts(config, "confidence", 5) == (6, 2, 2)  # a head at decisions 2 and 5 (the exit's reused)
    assert token_counts(config, "confidence", 9) == (10, 4, 3)  # three decisions' heads, then the last layer's


def test_modelled_joules_price_a_confidence_policy_s_heads():
    from greencode_jax.eval.joules import modelled_entry
    from greencode_jax.models import ModelConfig

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=10, num_heads=2, num_kv_heads=1,
                         head_dim=8, intermediate_size=32, max_position_embeddings=64, norm_eps=1e-5,
                         activation="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                         exit_layers=(2, 5, 7))
    cost = {"a_j": 0.2, "b_j_per_layer": 0.01, "c_j_per_head": 0.08, "d_j_per_decision": 0.002,
            "method": "estimated", "num_layers": 10}
    full = modelled_entry([9, 9], cost, config, "full")["joules"]
    confidence = modelled_entry([9, 5], cost, config, "confidence")["joules"]
    assert full == pytest.approx(2 * (0.2 + 0.1 + 0.08))
    assert confidence == pytest.approx((0.2 + 0.1 + 4 * 0.08 + 3 * 0.002) + (0.2 + 0.06 + 2 * 0.08 + 2 * 0.002))
    assert confidence > full  # it stopped early once, yet its heads cost more than they saved


def test_a_price_that_comes_out_negative_is_fitted_at_zero():
    """Decisions that cost nothing, measured with noise, can fit a small negative price; the
    constrained fit holds it at zero and says so, and the other prices absorb the difference."""
    from greencode_jax.energy.calibrate import fit_terms

    for seed in range(40):
        samples = _samples(0.2, 0.01, 0.08, 0.0, COUNTS, noise=0.004, seed=seed)
        design = np.array([[1, *c] for c in COUNTS], float)
        free, *_ = np.linalg.lstsq(design, [s.joules_per_token for s in samples], rcond=None)
        if free[3] < 0:
            break
    else:
        pytest.fail("no draw gave a negative decision price")
    fit = fit_terms(samples)
    assert fit.d_j_per_decision == 0.0 and any("d_j_per_decision came out negative" in w for w in fit.warnings)
    # with the decision price at its bound, the others are the least squares of the remaining columns
    rest, *_ = np.linalg.lstsq(design[:, :3], [s.joules_per_token for s in samples], rcond=None)
    np.testing.assert_allclose([fit.a_j, fit.b_j_per_layer, fit.c_j_per_head], rest, rtol=1e-8, atol=1e-12)
    assert fit.intervals["d_j_per_decision"][0] == 0.0
