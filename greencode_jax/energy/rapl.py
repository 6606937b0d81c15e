"""CPU energy from RAPL counters under /sys/class/powercap: every package, plus DRAM where present.

Zones `intel-rapl:N` are packages; their sub-zone named "dram" is memory. The "core"
and "uncore" sub-zones are parts of the package and are left out so nothing is counted
twice (AMD's RAPL appears under the same names). `energy_uj` wraps at
`max_energy_range_uj`; a counter that reads lower at the end has wrapped once (RAPL
wraps after minutes, so a window spanning two wraps is not expected).
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time
from pathlib import Path

from greencode_jax.energy.backend import Backend
from greencode_jax.energy.result import COUNTER, DeviceReading


class RaplUnavailable(Exception):
    """No readable RAPL zone; the message says why."""


@dataclasses.dataclass(frozen=True)
class Zone:
    path: Path
    name: str
    max_range_uj: int | None

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text())


def _index(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in path.name.split(":")[1:])


def rapl_zones(root: str | Path) -> list[Zone]:
    """The readable package and DRAM zones under `root`; raises `RaplUnavailable` with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise RaplUnavailable(f"{root} does not exist (no powercap interface: usual in VMs and containers)")
    packages = sorted((p for p in root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name)), key=_index)
    if not packages:
        raise RaplUnavailable(f"no RAPL package zones (intel-rapl:N) under {root}")
    paths = []
    for package in packages:
        paths.append(package)
        subzones = sorted((p for p in package.iterdir() if re.fullmatch(r"intel-rapl:\d+:\d+", p.name)), key=_index)
        paths += [p for p in subzones if _read_text(p / "name") == "dram"]
    zones = []
    for path in paths:
        try:
            max_range = int(_read_text(path / "max_energy_range_uj") or 0) or None
            zone = Zone(path, _read_text(path / "name") or path.name, max_range)
            zone.read_uj()
        except PermissionError:
            raise RaplUnavailable(f"{path / 'energy_uj'}: permission denied (root-only since Linux 5.10); "
                                  "run as root or make it readable") from None
        except (OSError, ValueError) as error:
            raise RaplUnavailable(f"{path / 'energy_uj'}: unreadable ({error})") from None
        zones.append(zone)
    return zones


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def counter_delta(begin: int, end: int, max_range: int | None) -> int | None:
    """end - begin, across one wrap at `max_range`; None if it went backwards with no known range."""
    if end >= begin:
        return end - begin
    return end + max_range - begin if max_range else None


class Rapl(Backend):
    name, method = "rapl", COUNTER

    def __init__(self, device, reason, zones: list[Zone]):
        super().__init__(device, reason, {"kernel": platform.release()})
        self.zones = zones
        self.device = {**device, "rapl_zones": [f"{z.path.name} ({z.name})" for z in zones]}

    def _read(self):
        try:
            return [zone.read_uj() for zone in self.zones], None
        except (OSError, ValueError) as error:
            return None, f"{type(error).__name__}: {error}"

    def begin(self):
        values, error = self._read()
        return time.perf_counter(), values, error

    def end(self, mark) -> DeviceReading:
        start, begin, begin_error = mark
        end, end_error = self._read()
        duration = time.perf_counter() - start
        if begin_error or end_error:
            where = "start" if begin_error else "end"
            failure = f"RAPL read failed at the window's {where}: {begin_error or end_error}"
            return self.reading(None, duration, failure=failure, warnings=[failure])
        raw, total, warnings = {"unit": "uJ", "zones": {}}, 0, []
        for zone, b, e in zip(self.zones, begin, end):
            delta = counter_delta(b, e, zone.max_range_uj)
            raw["zones"][f"{zone.path.name} ({zone.name})"] = {"begin_uj": b, "end_uj": e, "delta_uj": delta,
                                                               "max_energy_range_uj": zone.max_range_uj}
            if e < b and delta is not None:
                warnings.append(f"{zone.path.name} ({zone.name}) wrapped at {zone.max_range_uj} uJ; counted once")
            if delta is None:
                failure = f"{zone.path.name} went backwards ({b} -> {e} uJ) and has no max_energy_range_uj"
                return self.reading(None, duration, failure=failure, raw=raw, warnings=[*warnings, failure])
            total += delta
        if total == 0:
            failure = f"no RAPL counter advanced in {duration:.4f} s: 0 J would not be a measurement"
            return self.reading(None, duration, failure=failure, raw=raw, warnings=[*warnings, failure])
        return self.reading(total / 1e6, duration, raw=raw, warnings=warnings)
