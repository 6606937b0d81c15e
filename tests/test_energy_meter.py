"""The meter's own logic on CPU: windows, sync, results, the trapezoid rule, estimates and config."""

from __future__ import annotations

import dataclasses
import json
import time

import jax.numpy as jnp
import pytest

from greencode_jax.energy import ESTIMATED, UNAVAILABLE, EnergyConfig, EnergyMeter
from greencode_jax.energy.config import load_tpu_constants, tpu_power_constants
from greencode_jax.energy.devices import DeviceSpec, jax_accelerators
from greencode_jax.energy.estimate import CpuTime, duty_cycle_power_w
from greencode_jax.energy.poller import PowerPoller
from greencode_jax.energy.select import Selection, select_backends
from greencode_jax.errors import GreencodeError

CPU = DeviceSpec("cpu", 0, "test CPU")


def scripted(values):
    """A clock (or read function) that returns `values` in turn."""
    items = iter(values)
    return lambda: next(items)


def cpu_meter(clock, watts_per_core=12.0, sync=None):
    backend = CpuTime(CPU.identity(), "estimated: process CPU time", watts_per_core, clock=clock)
    return EnergyMeter(selections=[Selection(CPU, backend, [])], sync=sync)


def test_cpu_estimate_is_cpu_seconds_times_watts_per_core():
    meter = cpu_meter(scripted([100.0, 102.5]), watts_per_core=12.0)
    meter.begin("w")
    reading = meter.end("w").devices[0]
    assert reading.method == ESTIMATED and reading.energy_j == pytest.approx(2.5 * 12.0)
    assert reading.assumptions["watts_per_core"] == 12.0 and reading.assumptions["cpu_seconds"] == pytest.approx(2.5)
    assert "not measured" in reading.assumptions["source"]
    assert reading.avg_power_w == pytest.approx(30.0 / reading.duration_s)


def test_cpu_estimate_on_real_work_follows_the_process_clock():
    with EnergyMeter(EnergyConfig(cpu_backend="estimate", watts_per_core=7.0), devices=[CPU]) as meter:
        with meter.window("busy") as w:
            deadline = time.process_time() + 0.1
            while time.process_time() < deadline:
                pass
    reading = w.result.devices[0]
    assert reading.raw["cpu_seconds"] >= 0.1
    assert reading.energy_j == pytest.approx(7.0 * reading.raw["cpu_seconds"], rel=1e-12)


def test_idle_cpu_window_estimates_zero_with_a_warning():
    meter = cpu_meter(scripted([5.0, 5.0]))
    meter.begin("idle")
    reading = meter.end("idle").devices[0]
    assert reading.energy_j == 0.0 and "no measurable CPU time" in reading.warnings[0]


def test_windows_nest_and_overlap_each_with_its_own_reads():
    meter = cpu_meter(scripted([0.0, 1.0, 3.0, 6.0]), watts_per_core=1.0)
    meter.begin("outer")  # clock 0
    meter.begin("inner")  # clock 1
    outer = meter.end("outer")  # clock 3: overlapping, ended before "inner"
    inner = meter.end("inner")  # clock 6
    assert outer.devices[0].energy_j == pytest.approx(3.0)
    assert inner.devices[0].energy_j == pytest.approx(5.0)
    assert outer.name == "outer" and inner.name == "inner"


def test_window_names_are_checked():
    meter = cpu_meter(time.process_time)
    meter.begin("a")
    with pytest.raises(GreencodeError, match="'a' is already open"):
        meter.begin("a")
    with pytest.raises(GreencodeError, match="'b' is not open"):
        meter.end("b")
    meter.end("a")
    with pytest.raises(GreencodeError, match="'a' is not open"):
        meter.end("a")


def test_sync_hook_runs_before_every_read_and_outputs_are_blocked_on():
    calls = []
    meter = cpu_meter(time.process_time, sync=lambda: calls.append("sync"))
    with meter.window("w") as w:
        calls.append("body")
        w.block_on(jnp.ones((64, 64)) @ jnp.ones((64, 64)))
    assert calls == ["sync", "body", "sync"]
    meter.begin("x")
    meter.end("x", outputs=jnp.zeros(3))
    assert calls[-2:] == ["sync", "sync"]


def test_a_failing_block_frees_its_window_and_keeps_the_error():
    meter = cpu_meter(time.process_time)
    with pytest.raises(ZeroDivisionError):
        with meter.window("w"):
            1 / 0
    with meter.window("w") as w:  # the name is free again
        pass
    assert w.result.devices[0].method == ESTIMATED


def test_result_is_json_serialisable_with_labels():
    meter = cpu_meter(scripted([1.0, 1.25]), watts_per_core=4.0)
    meter.begin("w")
    result = meter.end("w")
    data = json.loads(result.to_json())
    device = data["devices"][0]
    assert device["method"] == "estimated" and device["energy_j"] == pytest.approx(1.0)
    assert data["totals"]["estimated_j"] == pytest.approx(1.0) and data["totals"]["measured_j"] is None
    for field in ("reason", "duration_s", "avg_power_w", "device", "raw", "warnings", "assumptions", "versions"):
        assert field in device


def test_unavailable_device_is_none_not_zero():
    with EnergyMeter(EnergyConfig(cpu_backend="off"), devices=[CPU]) as meter:
        meter.begin("w")
        result = meter.end("w")
    reading = result.devices[0]
    assert reading.method == UNAVAILABLE and reading.energy_j is None and "off" in reading.reason
    assert result.estimated_j is None and result.measured_j is None and result.unavailable == ["cpu:host"]


def test_trapezoid_integral_by_hand():
    # Samples (t, W): (0, 10), (1, 20), (3, 40), (3, 99: a repeat, dropped), (4, 40).
    poller = PowerPoller(scripted([(0.0, [10.0]), (1.0, [20.0]), (3.0, [40.0]), (3.0, [99.0]), (4.0, [40.0])]), 1.0)
    stamps = [poller.sample_now() for _ in range(5)]
    assert stamps == [0.0, 1.0, 3.0, 3.0, 4.0]
    whole = poller.integrate(0.0, 4.0)
    assert whole.samples == 4 and whole.energy_j == pytest.approx(1 * 15 + 2 * 30 + 1 * 40)
    assert whole.max_gap_s == pytest.approx(2.0)
    assert poller.integrate(1.0, 3.0).energy_j == pytest.approx(60.0)
    assert poller.integrate(3.0, 3.0).energy_j is None  # one sample: no figure


def test_poller_columns_errors_and_retention():
    reads = [(0.0, [1.0, 100.0]), RuntimeError("device gone"), (2.0, [3.0, 300.0]), (3.0, [3.0, 300.0])]

    def read():
        item = reads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    poller = PowerPoller(read, 1.0)
    start = poller.sample_now()
    token = poller.hold(start)
    assert poller.sample_now() == 0.0  # failed read: the newest sample is still t=0
    poller.sample_now(), poller.sample_now()
    column1 = poller.integrate(0.0, 3.0, column=1)
    assert column1.energy_j == pytest.approx(2 * 200 + 300) and column1.errors == ["RuntimeError: device gone"]
    poller.release(token)  # nothing open: only the newest sample is kept
    assert poller.integrate(0.0, 3.0).samples == 1


def test_duty_cycle_power_by_hand():
    assert duty_cycle_power_w(50.0, 90.0, 192.0) == pytest.approx(141.0)
    assert duty_cycle_power_w(0.0, 90.0, 192.0) == 90.0
    assert duty_cycle_power_w(130.0, 90.0, 192.0) == 192.0  # clipped to 100 %


def test_config_validation_names_the_field():
    with pytest.raises(GreencodeError, match="gpu_backend='nvml'"):
        EnergyConfig(gpu_backend="nvml")
    with pytest.raises(GreencodeError, match="watts_per_core=0"):
        EnergyConfig(watts_per_core=0)
    with pytest.raises(GreencodeError, match="tpu_idle_w=200 exceeds tpu_peak_w=100"):
        EnergyConfig(tpu_idle_w=200, tpu_peak_w=100)
    with pytest.raises(GreencodeError, match="unknown energy config field 'watts_per_cor' .*'watts_per_core'"):
        EnergyConfig().with_overrides(["watts_per_cor=3"])
    config = EnergyConfig().with_overrides(["watts_per_core=12", "gpu_backend=power", "tpu_peak_w=250"])
    assert (config.watts_per_core, config.gpu_backend, config.tpu_peak_w) == (12, "power", 250)
    assert dataclasses.replace(config, cpu_backend="rapl").cpu_backend == "rapl"


def test_tpu_constants_carry_sources_and_user_overrides_win(tmp_path):
    generations = load_tpu_constants()
    assert all(entry["source"] for entry in generations.values())
    v4 = tpu_power_constants("TPU v4", EnergyConfig())
    assert (v4["idle_w"], v4["peak_w"]) == (90.0, 192.0) and "cloud.google.com/tpu/docs/v4" in v4["source"]
    unknown = tpu_power_constants("TPU v5 lite", EnergyConfig())
    assert unknown["idle_w"] is None and unknown["peak_w"] is None
    mine = tpu_power_constants("TPU v5 lite", EnergyConfig(tpu_idle_w=40.0, tpu_peak_w=160.0))
    assert (mine["idle_w"], mine["peak_w"]) == (40.0, 160.0) and "EnergyConfig.tpu_idle_w" in mine["source"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("generations: {v9: {device_kinds: [TPU v9], idle_w: -1, peak_w: 3, source: me}}\n")
    with pytest.raises(GreencodeError, match="generations.v9.idle_w=-1"):
        tpu_power_constants("TPU v9", EnergyConfig(tpu_constants=str(bad)))


def test_this_machines_devices():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("JAX has accelerators here")
    assert jax_accelerators() == []  # a CPU-only JAX here: the host CPU is the only device
    selections = select_backends()
    assert [s.spec.platform for s in selections] == ["cpu"]
    assert selections[0].backend.method in ("counter", "estimated")
