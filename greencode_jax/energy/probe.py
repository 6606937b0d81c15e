"""`greencode energy probe`: what this machine can measure, per device and method, and why not."""

from __future__ import annotations

import time

from greencode_jax.config import EnergyConfig
from greencode_jax.energy.meter import EnergyMeter
from greencode_jax.energy.nvml import load_nvml
from greencode_jax.energy.result import UNAVAILABLE


def probe(config: EnergyConfig | None = None, sample_s: float = 0.5, selections=None) -> dict:
    """Per device: the method chosen, why, what was tried before it, and a live sample of `sample_s`."""
    import jax  # lazy: keeps energy free of JAX

    config = config or EnergyConfig()
    meter = EnergyMeter(config, selections=selections)
    report = {"jax": {"version": jax.__version__, "backend": jax.default_backend()}, "devices": []}
    try:
        sample = None
        if sample_s > 0:
            meter.begin("probe")
            time.sleep(sample_s)
            sample = meter.end("probe")
        for i, selection in enumerate(meter.selections):
            backend = selection.backend
            row = {"key": selection.spec.key, "kind": selection.spec.kind, "backend": backend.name,
                   "method": backend.method, "reason": backend.reason,
                   "tried": [{"backend": name, "why_not": why} for name, why in selection.attempts],
                   "versions": backend.versions}
            if sample is not None:
                reading = sample.devices[i]
                row["sample"] = {"seconds": reading.duration_s, "method": reading.method,
                                 "energy_j": reading.energy_j, "avg_power_w": reading.avg_power_w,
                                 "warnings": reading.warnings}
            report["devices"].append(row)
    finally:
        meter.close()
    platforms = {s.spec.platform for s in meter.selections}
    if "gpu" not in platforms:
        report["gpu"] = "no GPU visible to JAX" + _nvml_gpus()
    if "tpu" not in platforms:
        report["tpu"] = "no TPU chip visible to JAX (libtpu's tpumonitoring not consulted)"
    return report


def _nvml_gpus() -> str:
    nvml, reason = load_nvml()
    if nvml is None:
        return f"; {reason}"
    try:
        names = [str(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i)))
                 for i in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as error:
        return f"; NVML error listing GPUs: {error}"
    if not names:
        return "; NVML sees none"
    return f"; NVML sees {len(names)} GPU(s) {names}: is JAX installed with CUDA support?"


def format_probe(report: dict) -> str:
    lines = [f"energy probe: JAX {report['jax']['version']} ({report['jax']['backend']})"]
    for row in report["devices"]:
        lines.append(f"  {row['key']}  {row['kind']}")
        if row["method"] == UNAVAILABLE:
            lines.append("    method: UNAVAILABLE")
        else:
            lines.append(f"    method: {row['method']} via {row['backend']}")
        lines.append(f"    why: {row['reason']}")
        if "sample" in row:
            s = row["sample"]
            if s["energy_j"] is None:
                lines.append(f"    {s['seconds']:.2f} s sample: no figure ({s['method']})")
            else:
                lines.append(f"    {s['seconds']:.2f} s sample: {s['energy_j']:.4g} J, {s['avg_power_w']:.4g} W "
                             f"({s['method']})")
            lines += [f"    warning: {w}" for w in s["warnings"]]
        if row["versions"]:
            lines.append("    versions: " + ", ".join(f"{k} {v}" for k, v in row["versions"].items()))
    for kind in ("gpu", "tpu"):
        if kind in report:
            lines.append(f"  {kind}: {report[kind]}")
    return "\n".join(lines)
