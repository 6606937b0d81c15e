"""The devices a meter reads: JAX's accelerators (one entry per GPU, one per TPU chip) and the host CPU.

JAX's own CPU devices are the host, so they are not listed twice.
"""

from __future__ import annotations

import dataclasses
import os
import platform as _platform


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    platform: str  # "gpu", "tpu" or "cpu"
    index: int  # JAX device id (0 for the host CPU)
    kind: str  # JAX device_kind, or the CPU model name
    local_hardware_id: int | None = None  # CUDA ordinal among visible GPUs; TPU chip id on this host
    pci_bus_id: str | None = None  # when the runtime exposes it
    chip: int | None = None  # TPU: position of the chip in tpumonitoring's per-chip lists

    @property
    def key(self) -> str:
        return "cpu:host" if self.platform == "cpu" else f"{self.platform}:{self.index}"

    def identity(self) -> dict:
        out = {"key": self.key, "platform": self.platform, "jax_id": self.index, "kind": self.kind}
        if self.local_hardware_id is not None:
            out["local_hardware_id"] = self.local_hardware_id
        if self.chip is not None:
            out["chip"] = self.chip
        return out


def host_cpu() -> DeviceSpec:
    return DeviceSpec("cpu", 0, _cpu_model())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{_platform.processor() or _platform.machine()} ({os.cpu_count()} logical cores)"


def jax_accelerators(jax_devices=None) -> list[DeviceSpec]:
    """GPUs and TPU chips among `jax_devices` (default: this process's local devices).

    TPU v2/v3 expose two JAX devices per chip: only core 0 is kept, since power belongs to
    the chip. Chips are numbered in `local_hardware_id` order, which is assumed to be the
    order of tpumonitoring's per-chip lists.
    """
    if jax_devices is None:
        import jax  # lazy: keeps energy free of JAX

        jax_devices = jax.local_devices()
    specs, tpus = [], []
    for device in jax_devices:
        hardware_id = getattr(device, "local_hardware_id", None)
        if device.platform in ("gpu", "cuda", "rocm"):
            specs.append(DeviceSpec("gpu", device.id, device.device_kind, hardware_id,
                                    getattr(device, "pci_bus_id", None)))
        elif device.platform == "tpu" and getattr(device, "core_on_chip", 0) == 0:
            tpus.append(device)
    tpus.sort(key=lambda d: (getattr(d, "local_hardware_id", None) or 0, d.id))
    specs += [DeviceSpec("tpu", d.id, d.device_kind, getattr(d, "local_hardware_id", None), chip=i)
              for i, d in enumerate(tpus)]
    return specs
