"""Choosing a backend per device, in the issue's order, and remembering why better ones failed.

GPU: NVML energy counter -> NVML power integrated -> estimate (constant draw).
TPU: tpumonitoring power metric -> duty-cycle estimate (see tpu.py).
CPU: RAPL -> CPU-time estimate.
`EnergyConfig.<kind>_backend` forces one choice (unavailable if it cannot work) or "off".
Vendor modules are parameters so tests can pass fakes; by default the real ones load
only when a device of their kind exists.
"""

from __future__ import annotations

import dataclasses
import os

from greencode_jax.energy import nvml as nvml_mod
from greencode_jax.energy.backend import Backend, Unavailable
from greencode_jax.config import EnergyConfig
from greencode_jax.energy.devices import DeviceSpec, host_cpu, jax_accelerators
from greencode_jax.energy.estimate import ConstantPower, CpuTime
from greencode_jax.energy.rapl import Rapl, RaplUnavailable, rapl_zones
from greencode_jax.energy.tpu import tpu_backends

_NOT_GIVEN = object()


@dataclasses.dataclass
class Selection:
    spec: DeviceSpec
    backend: Backend
    attempts: list[tuple[str, str]]  # (backend tried, why it was not used), in order


def default_devices(config: EnergyConfig, jax_devices=None) -> list[DeviceSpec]:
    specs = jax_accelerators(jax_devices)
    if config.include_host_cpu or not specs:
        specs.append(host_cpu())
    return specs


def select_backends(devices: list[DeviceSpec] | None = None, config: EnergyConfig | None = None, *,
                    nvml=_NOT_GIVEN, tpumonitoring=None, env=None, bus_id_of=nvml_mod.cuda_pci_bus_id
                    ) -> list[Selection]:
    """A `Selection` per device. `nvml`: a pynvml-like module already initialised (None: no NVML)."""
    config = config or EnergyConfig()
    devices = default_devices(config) if devices is None else devices
    env = os.environ if env is None else env
    selections = []
    gpus = [d for d in devices if d.platform == "gpu"]
    nvml_reason = None
    if gpus and nvml is _NOT_GIVEN:
        nvml, nvml_reason = nvml_mod.load_nvml()
    elif nvml is None:
        nvml_reason = "NVML not available"
    tpus = tpu_backends([d for d in devices if d.platform == "tpu"], config, tpumonitoring)
    for spec in devices:
        if spec.platform == "gpu":
            backend, attempts = _gpu(spec, config, nvml, nvml_reason, env, bus_id_of)
        elif spec.platform == "tpu":
            backend, attempts = tpus[spec.key]
        else:
            backend, attempts = _cpu(spec, config)
        selections.append(Selection(spec, backend, attempts))
    return selections


def _explain(attempts, chosen: str) -> str:
    if not attempts:
        return chosen
    return f"{chosen}; not better because " + "; ".join(f"{name}: {why}" for name, why in attempts)


def _cpu(spec: DeviceSpec, config: EnergyConfig):
    identity = spec.identity()
    if config.cpu_backend == "off":
        return Unavailable(identity, "CPU metering is off (EnergyConfig.cpu_backend)"), []
    order = ["rapl", "estimate"] if config.cpu_backend == "auto" else [config.cpu_backend]
    attempts = []
    for choice in order:
        if choice == "rapl":
            try:
                zones = rapl_zones(config.powercap_root)
            except RaplUnavailable as error:
                attempts.append(("rapl", str(error)))
                continue
            return Rapl(identity, _explain(attempts, "RAPL energy counters (packages + DRAM)"), zones), attempts
        return CpuTime(identity, _explain(attempts, f"estimated: process CPU time x {config.watts_per_core} W "
                                                    "per core"), config.watts_per_core), attempts
    return Unavailable(identity, "; ".join(f"{n}: {r}" for n, r in attempts)), attempts


def _gpu(spec: DeviceSpec, config: EnergyConfig, nvml, nvml_reason, env, bus_id_of):
    identity = spec.identity()
    if config.gpu_backend == "off":
        return Unavailable(identity, "GPU metering is off (EnergyConfig.gpu_backend)"), []
    order = ["counter", "power", "estimate"] if config.gpu_backend == "auto" else [config.gpu_backend]
    attempts, handle, notes, versions = [], None, [], {}
    if nvml is None:
        attempts += [(c, nvml_reason) for c in order if c != "estimate"]
    else:
        versions = nvml_mod.nvml_versions(nvml)
        try:
            handle, identity, notes = nvml_mod.resolve_gpu(nvml, spec, env, bus_id_of)
        except nvml_mod.Refused as refusal:  # MIG, or no NVML device for it: nothing to estimate from either
            return Unavailable(identity, str(refusal), versions), [("nvml", str(refusal))]
        except nvml.NVMLError as error:
            attempts += [(c, f"NVML error matching the GPU: {error}") for c in order if c != "estimate"]
    for choice in order:
        if choice == "counter" and handle is not None:
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except nvml.NVMLError as error:
                attempts.append(("counter", f"nvmlDeviceGetTotalEnergyConsumption: {error} (needs Volta or newer)"))
                continue
            reason = _explain(attempts, "NVML total energy counter (mJ), read at both ends of the window")
            return nvml_mod.NvmlCounter(identity, reason, nvml, handle, config.counter_period_s, versions,
                                        notes), attempts
        if choice == "power" and handle is not None:
            try:
                reason = _explain(attempts, "NVML power polled on a thread and integrated (trapezoid)")
                return nvml_mod.nvml_power_backend(identity, reason, nvml, handle, config.poll_interval_s,
                                                   versions, notes), attempts
            except nvml.NVMLError as error:
                attempts.append(("power", f"no NVML power reading: {error}"))
                continue
        if choice == "estimate":
            if config.gpu_watts is not None:
                watts, source = float(config.gpu_watts), "EnergyConfig.gpu_watts"
            elif handle is not None and (limit := nvml_mod.power_limit_w(nvml, handle)) is not None:
                watts, source = limit, "the NVML enforced power limit: an upper bound, not a measurement"
            else:
                attempts.append(("estimate", "no EnergyConfig.gpu_watts and no NVML power limit"))
                continue
            reason = _explain(attempts, f"estimated: constant {watts:g} W")
            return ConstantPower(identity, reason, watts, source, versions, notes), attempts
    return Unavailable(identity, "; ".join(f"{n}: {r}" for n, r in attempts), versions, notes), attempts
