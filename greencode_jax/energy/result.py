"""What a window measured, per device, labelled with how it was obtained.

`method` says how `energy_j` was obtained; when no trustworthy figure exists the method
is "unavailable", `energy_j` is None and `reason` says why (never a silent 0 J). Totals
keep measured and estimated joules apart.
"""

from __future__ import annotations

import dataclasses
import json

COUNTER = "counter"  # a hardware energy counter read at both ends (NVML total energy, RAPL)
INTEGRATED_POWER = "integrated_power"  # power sampled on a thread, integrated by the trapezoid rule
ESTIMATED = "estimated"  # a model from utilisation and configured constants, not a measurement
UNAVAILABLE = "unavailable"
MEASURED_METHODS = (COUNTER, INTEGRATED_POWER)


@dataclasses.dataclass
class DeviceReading:
    device: dict  # identity: platform, key, name and whatever identifies it (uuid, pci bus id, zones)
    backend: str  # which backend produced it, e.g. "nvml_counter", "rapl", "cpu_time"
    method: str
    reason: str  # why this method (what better methods lacked), or why none
    energy_j: float | None
    duration_s: float
    avg_power_w: float | None = None
    raw: dict = dataclasses.field(default_factory=dict)  # counter values / samples, with units
    warnings: list[str] = dataclasses.field(default_factory=list)
    assumptions: dict = dataclasses.field(default_factory=dict)  # constants behind an estimate
    versions: dict = dataclasses.field(default_factory=dict)  # library and driver versions
    idle_power_w: float | None = None  # from EnergyMeter.measure_idle, when measured
    energy_above_idle_j: float | None = None

    def __post_init__(self):
        if self.energy_j is None:
            self.method = UNAVAILABLE
        if self.energy_j is not None and self.avg_power_w is None and self.duration_s > 0:
            self.avg_power_w = self.energy_j / self.duration_s

    @property
    def measured(self) -> bool:
        return self.method in MEASURED_METHODS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def unavailable(device: dict, backend: str, reason: str, duration_s: float = 0.0, **extra) -> DeviceReading:
    return DeviceReading(device=device, backend=backend, method=UNAVAILABLE, reason=reason, energy_j=None,
                         duration_s=duration_s, **extra)


@dataclasses.dataclass
class WindowResult:
    name: str
    started_at: float  # Unix time at the window's start
    duration_s: float  # host wall-clock time between the two synchronised reads
    devices: list[DeviceReading]
    warnings: list[str] = dataclasses.field(default_factory=list)

    def _sum(self, methods) -> float | None:
        values = [d.energy_j for d in self.devices if d.method in methods]
        return sum(values) if values else None

    @property
    def measured_j(self) -> float | None:
        """Joules from counters and integrated power; None when no device was measured."""
        return self._sum(MEASURED_METHODS)

    @property
    def estimated_j(self) -> float | None:
        """Joules from estimates, kept apart from measured ones."""
        return self._sum((ESTIMATED,))

    @property
    def unavailable(self) -> list[str]:
        return [d.device.get("key", "?") for d in self.devices if d.method == UNAVAILABLE]

    def device(self, key: str) -> DeviceReading:
        for reading in self.devices:
            if reading.device.get("key") == key:
                return reading
        raise KeyError(f"no device {key!r} in window {self.name!r}; have {[d.device.get('key') for d in self.devices]}")

    def to_dict(self) -> dict:
        return {
            "name": self.name, "started_at": self.started_at, "duration_s": self.duration_s,
            "totals": {"counter_j": self._sum((COUNTER,)), "integrated_power_j": self._sum((INTEGRATED_POWER,)),
                       "measured_j": self.measured_j, "estimated_j": self.estimated_j,
                       "unavailable": self.unavailable,
                       "note": "measured and estimated joules are kept apart, never summed"},
            "devices": [d.to_dict() for d in self.devices],
            "warnings": list(self.warnings),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)
