"""TPU chips through a fake `libtpu.sdk.tpumonitoring`: duty-cycle estimate, a power metric, and refusals."""

from __future__ import annotations

import sys
import time
import types

import pytest

from greencode_jax.energy import ESTIMATED, INTEGRATED_POWER, UNAVAILABLE, EnergyConfig, EnergyMeter
from greencode_jax.energy.devices import DeviceSpec, host_cpu, jax_accelerators
from greencode_jax.energy.select import select_backends
from greencode_jax.energy.tpu import load_tpumonitoring

UTILISATION = ["duty_cycle_pct", "tensorcore_util", "hbm_capacity_usage", "hbm_capacity_total"]


def fake_tpumonitoring(supported, data: dict):
    """A module with tpumonitoring's two functions; `data[name]` is a list of per-chip strings
    (or an exception to raise). Every call is recorded in `module.calls`."""
    module = types.ModuleType("tpumonitoring")
    module.calls = []

    def list_supported_metrics():
        module.calls.append(("list_supported_metrics",))
        return list(supported)

    def get_metric(name):
        module.calls.append(("get_metric", name))
        value = data[name]
        if isinstance(value, Exception):
            raise value
        return types.SimpleNamespace(data=lambda: list(value), description=lambda: f"{name} per chip")

    module.list_supported_metrics, module.get_metric = list_supported_metrics, get_metric
    return module


def chips(kind="TPU v4", n=2):
    return [DeviceSpec("tpu", i, kind, local_hardware_id=i, chip=i) for i in range(n)]


def run_window(specs, config, monitoring, seconds=0.06):
    config = config or EnergyConfig(poll_interval_s=0.01)
    with EnergyMeter(config, selections=select_backends(specs, config, tpumonitoring=monitoring)) as meter:
        meter.begin("w")
        time.sleep(seconds)
        return meter.end("w"), meter.selections


def test_no_power_metric_estimates_from_duty_cycle_and_chip_constants():
    monitoring = fake_tpumonitoring(UTILISATION, {"duty_cycle_pct": ["50.0", "25.0"]})
    result, selections = run_window(chips(), None, monitoring)
    chip0, chip1 = result.devices
    assert chip0.method == ESTIMATED and chip0.backend == "tpu_duty_cycle"
    # TPU v4 constants (idle 90 W, peak 192 W): 90 + 0.50 x 102 = 141 W and 90 + 0.25 x 102 = 115.5 W.
    assert chip0.energy_j == pytest.approx(141.0 * chip0.duration_s, rel=1e-9)
    assert chip1.energy_j == pytest.approx(115.5 * chip1.duration_s, rel=1e-9)
    assert chip0.assumptions["idle_w"] == 90.0 and chip0.assumptions["peak_w"] == 192.0
    assert "cloud.google.com/tpu/docs/v4" in chip0.assumptions["source"]
    assert chip1.assumptions["mean_duty_cycle_pct"] == pytest.approx(25.0)
    assert "no power metric" in selections[0].attempts[0][1]
    assert result.estimated_j == pytest.approx(chip0.energy_j + chip1.energy_j) and result.measured_j is None
    # The list is asked first, and only listed metrics are read.
    assert monitoring.calls[0] == ("list_supported_metrics",)
    assert {c for c in monitoring.calls[1:]} == {("get_metric", "duty_cycle_pct")}


def test_a_listed_power_metric_is_integrated_as_measured():
    monitoring = fake_tpumonitoring([*UTILISATION, "chip_power_usage"],
                                    {"chip_power_usage": ["150.0", "170.0"], "duty_cycle_pct": ["10", "10"]})
    result, selections = run_window(chips(), None, monitoring)
    chip1 = result.devices[1]
    assert chip1.method == INTEGRATED_POWER and chip1.backend == "tpu_power_metric"
    assert chip1.energy_j == pytest.approx(170.0 * chip1.duration_s, rel=1e-9)
    assert chip1.raw["metric"] == "chip_power_usage" and any("read as watts" in w for w in chip1.warnings)
    assert result.measured_j == pytest.approx(result.devices[0].energy_j + chip1.energy_j)
    assert ("get_metric", "duty_cycle_pct") not in monitoring.calls


def test_unknown_generation_is_unavailable_until_constants_are_given():
    monitoring = fake_tpumonitoring(UTILISATION, {"duty_cycle_pct": ["100"]})
    result, _ = run_window(chips("TPU v5 lite", 1), None, monitoring)
    assert result.devices[0].method == UNAVAILABLE and "tpu_idle_w" in result.devices[0].reason
    config = EnergyConfig(poll_interval_s=0.01, tpu_idle_w=40.0, tpu_peak_w=160.0)
    result, _ = run_window(chips("TPU v5 lite", 1), config, monitoring)
    reading = result.devices[0]
    assert reading.method == ESTIMATED and reading.energy_j == pytest.approx(160.0 * reading.duration_s, rel=1e-9)


def test_metric_errors_mid_window_are_warnings():
    data = {"duty_cycle_pct": ["40.0"]}
    monitoring = fake_tpumonitoring(UTILISATION, data)
    config = EnergyConfig(poll_interval_s=0.01)
    with EnergyMeter(config, selections=select_backends(chips(n=1), config, tpumonitoring=monitoring)) as meter:
        meter.begin("w")
        time.sleep(0.05)
        data["duty_cycle_pct"] = RuntimeError("libtpu: metric service unavailable")
        time.sleep(0.03)
        reading = meter.end("w").devices[0]
    assert reading.energy_j == pytest.approx((90 + 0.4 * 102) * reading.duration_s, rel=1e-9)
    assert any("power read(s) failed" in w and "metric service unavailable" in w for w in reading.warnings)


def test_a_chip_missing_from_the_metric_has_no_figure():
    monitoring = fake_tpumonitoring(UTILISATION, {"duty_cycle_pct": ["30.0"]})  # one value, two chips
    result, _ = run_window(chips(n=2), None, monitoring)
    assert result.devices[0].method == ESTIMATED
    assert result.devices[1].method == UNAVAILABLE and "fewer than two power samples" in result.devices[1].reason


def test_tpumonitoring_is_untouched_without_tpu_chips(monkeypatch):
    untouchable = types.ModuleType("tpumonitoring")
    untouchable.__getattr__ = lambda name: pytest.fail(f"tpumonitoring.{name} used with no TPU chip")
    sdk = types.ModuleType("libtpu.sdk")
    sdk.tpumonitoring = untouchable
    monkeypatch.setitem(sys.modules, "libtpu", types.ModuleType("libtpu"))
    monkeypatch.setitem(sys.modules, "libtpu.sdk", sdk)
    monkeypatch.setitem(sys.modules, "libtpu.sdk.tpumonitoring", untouchable)
    selections = select_backends([host_cpu()], EnergyConfig())
    assert [s.spec.platform for s in selections] == ["cpu"]


def test_this_machine_has_no_libtpu():
    module, reason = load_tpumonitoring()
    if module is not None:
        pytest.skip("libtpu is installed here")
    assert "libtpu.sdk.tpumonitoring is not importable" in reason
    selection = select_backends(chips(n=1), EnergyConfig())[0]
    assert selection.backend.method == UNAVAILABLE and "not importable" in selection.backend.reason


def test_jax_tpu_devices_become_one_entry_per_chip():
    def device(i, hw, core, kind="TPU v3"):
        return types.SimpleNamespace(id=i, platform="tpu", device_kind=kind, local_hardware_id=hw, core_on_chip=core)

    # TPU v3: two cores per chip; listed out of order. Only core 0 of each chip is kept.
    specs = jax_accelerators([device(3, 1, 1), device(2, 1, 0), device(1, 0, 1), device(0, 0, 0)])
    assert [(s.index, s.chip, s.key) for s in specs] == [(0, 0, "tpu:0"), (2, 1, "tpu:2")]
    cpu = types.SimpleNamespace(id=0, platform="cpu", device_kind="cpu", local_hardware_id=0)
    assert jax_accelerators([cpu]) == []
