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
