"""The per-generation TPU power constants behind TPU estimates (`tpu_power.yaml`), with the
user's `EnergyConfig` overrides (the meter's settings live in `greencode_jax.config`)."""

from __future__ import annotations

from pathlib import Path

from greencode_jax.config import EnergyConfig
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import read_yaml

TPU_CONSTANTS = Path(__file__).with_name("tpu_power.yaml")


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
