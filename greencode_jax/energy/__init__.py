"""Energy metering for JAX work: NVML on GPUs, libtpu telemetry on TPUs, RAPL on CPUs, and
labelled estimates where nothing can be measured.

Every figure says how it was obtained (`counter`, `integrated_power`, `estimated`,
`unavailable`); measured and estimated joules are never added together.
"""

from greencode_jax.energy.calibrate import CostModel, CostSample, fit_cost_model, fit_line, window_measure
from greencode_jax.config import EnergyConfig
from greencode_jax.energy.devices import DeviceSpec
from greencode_jax.energy.meter import EnergyMeter
from greencode_jax.energy.probe import format_probe, probe
from greencode_jax.energy.result import (
    COUNTER, ESTIMATED, INTEGRATED_POWER, UNAVAILABLE, DeviceReading, WindowResult,
)
from greencode_jax.energy.select import Selection, select_backends

__all__ = ["COUNTER", "ESTIMATED", "INTEGRATED_POWER", "UNAVAILABLE", "CostModel", "CostSample", "DeviceReading",
           "DeviceSpec", "EnergyConfig", "EnergyMeter", "Selection", "WindowResult", "fit_cost_model", "fit_line",
           "format_probe", "probe", "select_backends", "window_measure"]
