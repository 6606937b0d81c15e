"""NVIDIA GPUs through an autospecced `pynvml`: counters, polled power, errors, MIG and device mapping.

The fake is `create_autospec(pynvml)` with the real exception classes and constants, and
each function's behaviour scripted per GPU; everything of ours runs for real.
"""

from __future__ import annotations

import dataclasses
import json
import time
from unittest import mock

import pynvml
import pytest

from greencode_jax.energy import COUNTER, ESTIMATED, INTEGRATED_POWER, UNAVAILABLE, EnergyConfig, EnergyMeter
from greencode_jax.energy.devices import DeviceSpec
from greencode_jax.energy.estimate import CpuTime
from greencode_jax.energy.nvml import load_nvml
from greencode_jax.energy.select import Selection, select_backends


@dataclasses.dataclass
class Gpu:
    """What one fake GPU answers.

    `energy_mj` items are returned in turn, the last one forever; an exception item is
    raised. The first is read when the backend is chosen (the support check).
    """

    uuid: str
    bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: list | None = None  # None: the counter is NOT_SUPPORTED
    power_mw: int | None = 200_000  # instant power; None: NOT_SUPPORTED
    average_mw: int | None = None  # nvmlDeviceGetPowerUsage; None: NOT_SUPPORTED
    fixed_stamp_us: int | None = None  # instant power's driver timestamp (None: now)
    fail_power_after: int | None = None  # instant power reads that succeed before GPU_IS_LOST
    mig: bool = False
    limit_mw: int = 700_000
    power_reads: int = 0


def autospec_nvml(gpus: list[Gpu]):
    nvml = mock.create_autospec(pynvml)
    for name in dir(pynvml):  # data and exception classes are not behaviour: keep the real ones
        value = getattr(pynvml, name)
        is_error = isinstance(value, type) and issubclass(value, Exception)
        if is_error or (name.startswith("NVML_") and isinstance(value, int)):
            setattr(nvml, name, value)

    def gpu(handle) -> Gpu:
        return gpus[int(handle[1:])]

    def handle_by_index(index):
        if not 0 <= index < len(gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return f"h{index}"

    def pci_info(handle):
        info = pynvml.nvmlPciInfo_t()
        info.busId = gpu(handle).bus_id.encode()
        return info

    def mig_mode(handle):
        if not gpu(handle).mig:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE]

    def energy(handle):
        g = gpu(handle)
        if g.energy_mj is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        value = g.energy_mj.pop(0) if len(g.energy_mj) > 1 else g.energy_mj[0]
        if isinstance(value, Exception):
            raise value
        return value

    def field_values(handle, field_ids):
        g = gpu(handle)
        assert field_ids == [pynvml.NVML_FI_DEV_POWER_INSTANT]
        field = pynvml.c_nvmlFieldValue_t()
        field.fieldId = field_ids[0]
        g.power_reads += 1
        if g.fail_power_after is not None and g.power_reads > g.fail_power_after:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if g.power_mw is None:
            field.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            return [field]
        field.nvmlReturn = pynvml.NVML_SUCCESS
        field.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
        field.value.uiVal = g.power_mw
        field.timestamp = g.fixed_stamp_us if g.fixed_stamp_us is not None else int(time.time() * 1e6)
        return [field]

    def power_usage(handle):
        if gpu(handle).average_mw is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu(handle).average_mw

    nvml.nvmlDeviceGetCount.return_value = len(gpus)
    nvml.nvmlDeviceGetHandleByIndex.side_effect = handle_by_index
    nvml.nvmlDeviceGetUUID.side_effect = lambda h: gpu(h).uuid
    nvml.nvmlDeviceGetName.side_effect = lambda h: gpu(h).name
    nvml.nvmlDeviceGetPciInfo.side_effect = pci_info
    nvml.nvmlDeviceGetMigMode.side_effect = mig_mode
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = energy
    nvml.nvmlDeviceGetFieldValues.side_effect = field_values
    nvml.nvmlDeviceGetPowerUsage.side_effect = power_usage
    nvml.nvmlDeviceGetEnforcedPowerLimit.side_effect = lambda h: gpu(h).limit_mw
    nvml.nvmlSystemGetDriverVersion.return_value = "550.54.15"
    nvml.nvmlSystemGetNVMLVersion.return_value = "12.550.54.15"
    return nvml


def three_gpus(**overrides) -> list[Gpu]:
    return [Gpu(uuid=f"GPU-{c * 8}-0000", bus_id=f"00000000:{b}:00.0", **overrides)
            for c, b in (("a", "1B"), ("b", "41"), ("c", "8A"))]


def gpu_spec(ordinal=0) -> DeviceSpec:
    return DeviceSpec("gpu", ordinal, "NVIDIA H100 80GB HBM3", local_hardware_id=ordinal)


def meter_for(gpus, config=None, env=None, bus_id_of=lambda ordinal: None, specs=None):
    selections = select_backends(specs or [gpu_spec()], config or EnergyConfig(), nvml=autospec_nvml(gpus),
                                 env=env or {}, bus_id_of=bus_id_of)
    return EnergyMeter(config, selections=selections)


def one_window(meter, seconds=0.0):
    meter.begin("w")
    time.sleep(seconds)
    return meter.end("w")


def test_counter_delta_is_the_energy_in_joules():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=[999_000, 1_000_000, 1_003_500])]
    with meter_for(gpus) as meter:
        assert meter.selections[0].backend.name == "nvml_counter"
        reading = one_window(meter, 0.12).devices[0]
    assert reading.method == COUNTER and reading.energy_j == pytest.approx(3.5)
    assert reading.raw == {"begin_mj": 1_000_000, "end_mj": 1_003_500, "unit": "mJ",
                           "counter": "nvmlDeviceGetTotalEnergyConsumption"}
    assert reading.avg_power_w == pytest.approx(3.5 / reading.duration_s)
    assert reading.warnings == []
    assert reading.device["uuid"] == "GPU-a" and reading.device["name"] == "NVIDIA H100 80GB HBM3"
    assert reading.versions["driver"] == "550.54.15" and reading.versions["nvml"] == "12.550.54.15"
    assert "nvidia-ml-py" in reading.versions


def test_short_window_is_flagged_and_a_still_counter_is_not_zero_joules():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=[500, 500, 520, 700, 700])]
    with meter_for(gpus) as meter:
        short = one_window(meter).devices[0]
        still = one_window(meter).devices[0]
    assert short.method == COUNTER and short.energy_j == pytest.approx(0.02)
    assert any("shorter than the counter's update period" in w for w in short.warnings)
    assert still.method == UNAVAILABLE and still.energy_j is None
    assert "did not advance" in still.reason and any("did not advance" in w for w in still.warnings)


def test_backwards_counter_warns_and_reports_no_energy():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=[9_000, 9_000, 4_000])]
    with meter_for(gpus) as meter:
        reading = one_window(meter).devices[0]
    assert reading.energy_j is None and reading.method == UNAVAILABLE
    assert "went backwards (9000 -> 4000 mJ)" in reading.reason
    assert any("went backwards" in w for w in reading.warnings)


def test_nvml_error_mid_window_is_a_warning_not_a_crash():
    lost = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=[100, 200, lost, 300, 450])]
    with meter_for(gpus) as meter:
        reading = one_window(meter).devices[0]
        after = one_window(meter).devices[0]  # the meter keeps working afterwards
    assert reading.energy_j is None and reading.method == UNAVAILABLE
    assert "NVML error at the window's end" in reading.reason and "GpuIsLost" in reading.reason
    assert reading.raw["begin_mj"] == 200 and reading.raw["end_mj"] is None
    assert after.method == COUNTER and after.energy_j == pytest.approx(0.15)


def test_counter_not_supported_falls_back_to_integrated_instant_power():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=None, power_mw=200_000)]
    with meter_for(gpus, EnergyConfig(poll_interval_s=0.01)) as meter:
        selection = meter.selections[0]
        reading = one_window(meter, 0.15).devices[0]
    assert selection.attempts[0][0] == "counter" and "Not Supported" in selection.attempts[0][1]
    assert reading.method == INTEGRATED_POWER and reading.backend == "nvml_power"
    assert reading.raw["power_source"] == "NVML_FI_DEV_POWER_INSTANT"
    assert reading.raw["samples"] >= 3  # begin, end, and the thread's samples between
    # Constant 200 W: the trapezoid integral is exactly 200 W x the sampled span.
    assert reading.duration_s == pytest.approx(reading.raw["last_sample_s"] - reading.raw["first_sample_s"])
    assert reading.energy_j == pytest.approx(200.0 * reading.duration_s, rel=1e-9)
    assert 0.1 < reading.duration_s < 1.0


def test_average_power_is_used_when_there_is_no_instant_field_and_labelled():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=None, power_mw=None, average_mw=150_000)]
    with meter_for(gpus, EnergyConfig(poll_interval_s=0.01)) as meter:
        reading = one_window(meter, 0.1).devices[0]
    assert reading.method == INTEGRATED_POWER and reading.raw["power_source"] == "nvmlDeviceGetPowerUsage"
    assert reading.energy_j == pytest.approx(150.0 * reading.duration_s, rel=1e-9)
    assert "moving average" in reading.assumptions["power_source"]


def test_repeated_power_samples_are_dropped_by_timestamp():
    # The driver never refreshes the value: every read carries the same timestamp, so the
    # window holds one sample and reports no figure rather than 0 J or a double count.
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=None, fixed_stamp_us=1_700_000_000_000_000)]
    with meter_for(gpus, EnergyConfig(poll_interval_s=0.01)) as meter:
        reading = one_window(meter, 0.05).devices[0]
    assert gpus[0].power_reads >= 3
    assert reading.raw["samples"] == 1 and reading.energy_j is None
    assert "fewer than two power samples" in reading.reason


def test_power_read_failures_mid_window_are_counted_in_warnings():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=None, power_mw=100_000, fail_power_after=4)]
    with meter_for(gpus, EnergyConfig(poll_interval_s=0.01)) as meter:
        reading = one_window(meter, 0.3).devices[0]
    # Read 1 was the selection's check; 2 the window's start; 3-4 the thread; then GPU_IS_LOST.
    assert reading.raw["samples"] == 3
    assert reading.energy_j == pytest.approx(100.0 * reading.duration_s, rel=1e-9)
    assert any("power read(s) failed during the window" in w and "GpuIsLost" in w for w in reading.warnings)


def test_no_counter_no_power_estimates_from_the_power_limit_and_says_so():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=None, power_mw=None, limit_mw=300_000)]
    with meter_for(gpus) as meter:
        reading = one_window(meter, 0.02).devices[0]
    assert reading.method == ESTIMATED and reading.backend == "constant_power"
    assert reading.energy_j == pytest.approx(300.0 * reading.duration_s, rel=1e-12)
    assert reading.assumptions["watts"] == 300.0 and "upper bound" in reading.assumptions["source"]
    assert [name for name, _ in meter.selections[0].attempts] == ["counter", "power"]


def test_configured_backend_overrides_the_order():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=[1, 2], power_mw=80_000)]
    with meter_for(gpus, EnergyConfig(gpu_backend="power")) as meter:
        assert meter.selections[0].backend.name == "nvml_power"
    with meter_for(gpus, EnergyConfig(gpu_backend="estimate", gpu_watts=250.0)) as meter:
        reading = one_window(meter, 0.01).devices[0]
        assert reading.energy_j == pytest.approx(250.0 * reading.duration_s, rel=1e-12)
        assert reading.assumptions["source"] == "EnergyConfig.gpu_watts"
    with meter_for(gpus, EnergyConfig(gpu_backend="off")) as meter:
        assert one_window(meter).devices[0].method == UNAVAILABLE


def test_mig_is_refused_with_a_reason():
    gpus = three_gpus(energy_mj=[0, 1000], mig=True)
    with meter_for(gpus) as meter:
        reading = one_window(meter).devices[0]
    assert reading.method == UNAVAILABLE and "MIG is enabled" in reading.reason
    with meter_for(three_gpus(energy_mj=[0, 1000]), env={"CUDA_VISIBLE_DEVICES": "MIG-4f1c-77"}) as meter:
        reading = one_window(meter).devices[0]
    assert reading.method == UNAVAILABLE and "MIG slice" in reading.reason


@pytest.mark.parametrize("env, bus_id, ordinal, expected, mapped_by, warns", [
    ({}, None, 1, 1, "index", True),
    ({"CUDA_VISIBLE_DEVICES": "2,0"}, None, 0, 2, "index in CUDA_VISIBLE_DEVICES", True),
    ({"CUDA_VISIBLE_DEVICES": "2,0"}, None, 1, 0, "index in CUDA_VISIBLE_DEVICES", True),
    ({"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, None, 0, 2,
     "index in CUDA_VISIBLE_DEVICES", False),
    ({"CUDA_VISIBLE_DEVICES": "GPU-cccc"}, None, 0, 2, "uuid in CUDA_VISIBLE_DEVICES", False),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "0000:41:00.0", 0, 1, "pci_bus_id", False),  # the bus id wins
])
def test_jax_devices_map_to_nvml_devices(env, bus_id, ordinal, expected, mapped_by, warns):
    gpus = three_gpus()
    for i, g in enumerate(gpus):  # each GPU's counter advances by a different amount: 1, 2, 3 J
        g.energy_mj = [0, 0, (i + 1) * 1000]
    with meter_for(gpus, env=env, bus_id_of=lambda o: bus_id, specs=[gpu_spec(ordinal)]) as meter:
        reading = one_window(meter).devices[0]
    assert reading.device["nvml_index"] == expected and reading.device["mapped_by"] == mapped_by
    assert reading.device["uuid"] == gpus[expected].uuid
    assert reading.energy_j == pytest.approx(expected + 1)
    assert any("assuming CUDA enumerates in PCI order" in w for w in reading.warnings) == warns


def test_unmappable_gpu_is_unavailable_with_the_reason():
    with meter_for(three_gpus(energy_mj=[0, 5]), env={"CUDA_VISIBLE_DEVICES": "0"},
                   specs=[gpu_spec(1)]) as meter:
        reading = one_window(meter).devices[0]
    assert reading.method == UNAVAILABLE and "no entry in CUDA_VISIBLE_DEVICES='0'" in reading.reason


def test_measured_and_estimated_joules_are_kept_apart():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=[0, 0, 2_000])]
    selections = select_backends([gpu_spec()], EnergyConfig(), nvml=autospec_nvml(gpus), env={},
                                 bus_id_of=lambda o: None)
    cpu_seconds = iter([10.0, 10.5])  # the process's CPU clock at the window's two ends
    cpu = DeviceSpec("cpu", 0, "test CPU")
    selections.append(Selection(cpu, CpuTime(cpu.identity(), "estimated", 12.0, clock=lambda: next(cpu_seconds)), []))
    with EnergyMeter(selections=selections) as meter:
        result = one_window(meter)
    assert result.measured_j == pytest.approx(2.0)  # the GPU counter only
    assert result.estimated_j == pytest.approx(0.5 * 12.0)  # the CPU estimate only
    totals = json.loads(result.to_json())["totals"]
    assert totals["measured_j"] == pytest.approx(2.0) and totals["estimated_j"] == pytest.approx(6.0)
    assert totals["counter_j"] == pytest.approx(2.0) and totals["integrated_power_j"] is None
    assert "never summed" in totals["note"]


def test_idle_baseline_gives_power_above_idle():
    gpus = [Gpu("GPU-a", "00000000:1B:00.0", energy_mj=None, power_mw=50_000)]
    with meter_for(gpus, EnergyConfig(poll_interval_s=0.01)) as meter:
        idle = meter.measure_idle(0.1)
        gpus[0].power_mw = 200_000
        reading = one_window(meter, 0.1).devices[0]
    assert idle.devices[0].avg_power_w == pytest.approx(50.0, rel=1e-9)
    assert reading.idle_power_w == pytest.approx(50.0, rel=1e-9)
    assert reading.energy_above_idle_j == pytest.approx(150.0 * reading.duration_s, rel=1e-9)


def test_this_machine_without_nvml_reports_library_not_found():
    nvml, reason = load_nvml()
    if nvml is not None:
        pytest.skip("NVML works on this machine")
    assert "NVML library not found" in reason
    selections = select_backends([gpu_spec()], EnergyConfig(), env={})
    reading = one_window(EnergyMeter(selections=selections)).devices[0]
    assert reading.method == UNAVAILABLE and "NVML library not found" in reading.reason
    # With a configured constant the same GPU is estimated, and labelled so.
    selections = select_backends([gpu_spec()], EnergyConfig(gpu_watts=90.0), env={})
    reading = one_window(EnergyMeter(selections=selections), 0.01).devices[0]
    assert reading.method == ESTIMATED and reading.energy_j == pytest.approx(90.0 * reading.duration_s, rel=1e-12)
    assert "NVML library not found" in reading.reason
