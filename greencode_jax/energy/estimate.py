"""Estimates, for devices with no counter and no power reading. Labelled "estimated", with their constants.

- CPU: this process's CPU time (user + system, all threads) x watts per busy core.
- GPU: a constant draw (EnergyConfig.gpu_watts, else the NVML power limit: an upper bound).
- TPU: idle + duty cycle x (peak - idle), integrated over duty-cycle samples (see tpu.py).
"""

from __future__ import annotations

import time

from greencode_jax.energy.backend import Backend
from greencode_jax.energy.result import ESTIMATED, DeviceReading


def duty_cycle_power_w(duty_cycle_pct: float, idle_w: float, peak_w: float) -> float:
    """P = P_idle + duty_cycle x (P_peak - P_idle), the duty cycle clipped to 0-100 %."""
    duty = min(max(duty_cycle_pct, 0.0), 100.0) / 100.0
    return idle_w + duty * (peak_w - idle_w)


class CpuTime(Backend):
    name, method = "cpu_time", ESTIMATED

    def __init__(self, device, reason, watts_per_core: float, clock=time.process_time):
        super().__init__(device, reason)
        self.watts_per_core = watts_per_core
        self._cpu_clock = clock  # process CPU seconds (all threads, user + system)

    def begin(self):
        return time.perf_counter(), self._cpu_clock()

    def end(self, mark) -> DeviceReading:
        start, cpu_start = mark
        cpu_s, duration = self._cpu_clock() - cpu_start, time.perf_counter() - start
        warnings = []
        if cpu_s <= 0:
            warnings.append(f"this process used no measurable CPU time in {duration:.4f} s: the estimate is 0 J, "
                            "which says nothing about other processes or idle power")
        assumptions = {"formula": "energy_j = cpu_seconds x watts_per_core", "watts_per_core": self.watts_per_core,
                       "cpu_seconds": cpu_s, "source": "EnergyConfig.watts_per_core (not measured)",
                       "scope": "this process's CPU time only; idle power and other processes are not counted"}
        return self.reading(max(cpu_s, 0.0) * self.watts_per_core, duration, warnings=warnings,
                            assumptions=assumptions, raw={"cpu_seconds": cpu_s, "unit": "s"})


class ConstantPower(Backend):
    name, method = "constant_power", ESTIMATED

    def __init__(self, device, reason, watts: float, source: str, versions=None, notes=()):
        super().__init__(device, reason, versions, notes)
        self.watts, self.source = watts, source

    def begin(self):
        return time.perf_counter()

    def end(self, mark) -> DeviceReading:
        duration = time.perf_counter() - mark
        assumptions = {"formula": "energy_j = watts x duration_s", "watts": self.watts, "source": self.source}
        return self.reading(self.watts * duration, duration, assumptions=assumptions)
