"""`EnergyConfig`: which backend measures each kind of device, and the constants behind estimates.

Every field can come from a YAML section (`EnergyConfig.from_dict`) or a
`FIELD=VALUE` override on the command line (`EnergyConfig.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import yaml

from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import check_finite, read_yaml

# Backend choices per kind of device. "auto" tries them in the order:
# GPU counter -> integrated power -> estimate; TPU power metric -> duty-cycle estimate;
# CPU RAPL -> CPU-time estimate. Naming one forces it (unavailable if it cannot work).
GPU_BACKENDS = ("auto", "counter", "power", "estimate", "off")
TPU_BACKENDS = ("auto", "metric", "estimate", "off")
CPU_BACKENDS = ("auto", "rapl", "estimate", "off")

TPU_CONSTANTS = Path(__file__).with_name("tpu_power.yaml")

# Not a measured figure: a round number of the order of a server CPU's TDP per core
# (e.g. 205 W / 24 cores). Every estimate records it; set `watts_per_core` for your CPU.
DEFAULT_WATTS_PER_CORE = 10.0


@dataclasses.dataclass(frozen=True)
class EnergyConfig:
    gpu_backend: str = "auto"
    tpu_backend: str = "auto"
    cpu_backend: str = "auto"
    include_host_cpu: bool = True  # also meter the host CPU beside the accelerators
    poll_interval_s: float = 0.05  # background power / duty-cycle sampling period
    watts_per_core: float = DEFAULT_WATTS_PER_CORE  # CPU estimate: W per busy core
    gpu_watts: float | None = None  # GPU estimate: constant draw (default: the NVML power limit)
    tpu_idle_w: float | None = None  # TPU estimate: overrides the per-generation constant
    tpu_peak_w: float | None = None
    tpu_power_metric: str | None = None  # tpumonitoring metric to integrate (default: any name with "power")
    tpu_constants: str | None = None  # YAML of per-generation idle/peak watts (default: the packaged one)
    powercap_root: str = "/sys/class/powercap"
    counter_period_s: float = 0.1  # NVML energy counter refresh period (~20-100 ms): shorter windows warn

    def __post_init__(self):
        for name, choices in (("gpu_backend", GPU_BACKENDS), ("tpu_backend", TPU_BACKENDS),
                              ("cpu_backend", CPU_BACKENDS)):
            if getattr(self, name) not in choices:
                raise GreencodeError(f"energy config: {name}={getattr(self, name)!r}; expected one of {list(choices)}")
        try:
            check_finite(self, "energy")
        except GreencodeError as error:
            raise GreencodeError(f"energy config: {error}") from None
        for name in ("poll_interval_s", "watts_per_core", "counter_period_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise GreencodeError(f"energy config: {name}={value!r}; expected a positive number")
        for name in ("gpu_watts", "tpu_idle_w", "tpu_peak_w"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise GreencodeError(f"energy config: {name}={value!r}; expected a non-negative number of watts")
        if self.tpu_idle_w is not None and self.tpu_peak_w is not None and self.tpu_idle_w > self.tpu_peak_w:
            raise GreencodeError(f"energy config: tpu_idle_w={self.tpu_idle_w} exceeds tpu_peak_w={self.tpu_peak_w}")
        if not isinstance(self.include_host_cpu, bool):
            raise GreencodeError(f"energy config: include_host_cpu={self.include_host_cpu!r}; expected true or false")

    @classmethod
    def from_dict(cls, values: dict, source: str = "energy config") -> "EnergyConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise GreencodeError(f"{source}: unknown energy config field '{key}'{hint}")
        return cls(**values)

    def with_overrides(self, items: list[str]) -> "EnergyConfig":
        """`FIELD=VALUE` strings (VALUE parsed as YAML) applied on top of this config."""
        values = dataclasses.asdict(self)
        updates = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise GreencodeError(f"--set {item!r}: expected FIELD=VALUE, e.g. watts_per_core=12")
            updates[key.strip()] = yaml.safe_load(raw)
        return self.from_dict({**values, **updates}, source="--set")


def load_tpu_constants(path: str | Path | None = None) -> dict:
    """Per-generation idle/peak watts: {generation: {device_kinds, idle_w, peak_w, source}}."""
    path = Path(path) if path else TPU_CONSTANTS
    data = read_yaml(path, "TPU power constants file")
    if not isinstance(data.get("generations"), dict):
        raise GreencodeError(f"{path}: expected a mapping 'generations' of TPU generations")
    for name, entry in data["generations"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("device_kinds"), list) or "source" not in entry:
            raise GreencodeError(f"{path}: generation '{name}' needs device_kinds (a list), idle_w, peak_w and source")
        for field in ("idle_w", "peak_w"):
            value = entry.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise GreencodeError(f"{path}: generations.{name}.{field}={value!r}; expected watts or null")
    return data["generations"]


def tpu_power_constants(device_kind: str, config: EnergyConfig) -> dict:
    """{idle_w, peak_w, source} for a JAX `device_kind` such as "TPU v4"; user overrides win.

    A missing figure stays None: the caller reports the chip as unavailable rather than
    invent one.
    """
    entry, generation = {}, None
    for name, candidate in load_tpu_constants(config.tpu_constants).items():
        if device_kind.strip().lower() in (kind.strip().lower() for kind in candidate["device_kinds"]):
            entry, generation = candidate, name
            break
    idle, peak = entry.get("idle_w"), entry.get("peak_w")
    sources = []
    if config.tpu_idle_w is not None:
        idle = float(config.tpu_idle_w)
        sources.append("idle_w from EnergyConfig.tpu_idle_w")
    if config.tpu_peak_w is not None:
        peak = float(config.tpu_peak_w)
        sources.append("peak_w from EnergyConfig.tpu_peak_w")
    if generation is not None and (config.tpu_idle_w is None or config.tpu_peak_w is None):
        sources.append(f"{generation}: {entry['source']}")
    return {"generation": generation, "idle_w": idle, "peak_w": peak, "source": "; ".join(sources) or None}
