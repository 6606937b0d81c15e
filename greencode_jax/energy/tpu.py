"""TPU chips through libtpu's `tpumonitoring`: a power metric if it lists one, else a duty-cycle estimate.

Today `list_supported_metrics()` lists utilisation metrics (duty_cycle_pct,
tensorcore_util, HBM) and no power, so chips are estimated as
P = idle + duty_cycle x (peak - idle) with per-generation constants (tpu_power.yaml).
If a metric with "power" in its name ever appears it is integrated as measured power.
The module is only consulted once JAX has shown TPU chips, and `get_metric` only for
names the module lists: off a TPU it can block for ~30 s a call.
"""

from __future__ import annotations

import time

from greencode_jax.energy.backend import Polled, Unavailable
from greencode_jax.config import EnergyConfig
from greencode_jax.energy.config import tpu_power_constants
from greencode_jax.energy.estimate import duty_cycle_power_w
from greencode_jax.energy.poller import PowerPoller
from greencode_jax.energy.result import ESTIMATED, INTEGRATED_POWER

DUTY_CYCLE = "duty_cycle_pct"


def load_tpumonitoring():
    """`(module, None)` or `(None, reason)`."""
    try:
        from libtpu.sdk import tpumonitoring
    except Exception as error:  # ImportError, or libtpu failing to initialise
        return None, f"libtpu.sdk.tpumonitoring is not importable ({type(error).__name__}: {error})"
    return tpumonitoring, None


def _versions() -> dict:
    try:
        from importlib.metadata import version

        return {"libtpu": version("libtpu")}
    except Exception:
        return {"libtpu": "unknown"}


def _floats(monitoring, metric: str) -> list[float]:
    return [float(value) for value in monitoring.get_metric(metric).data()]


def find_power_metric(names: list[str], config: EnergyConfig) -> str | None:
    if config.tpu_power_metric is not None:
        return config.tpu_power_metric if config.tpu_power_metric in names else None
    candidates = sorted(n for n in names if "power" in n.lower())
    return candidates[0] if candidates else None


def tpu_backends(specs, config: EnergyConfig, monitoring=None):
    """{spec.key: (backend, attempts)} for TPU chip `specs`; `monitoring` defaults to libtpu's module."""
    if not specs:
        return {}
    if config.tpu_backend == "off":
        return {s.key: (Unavailable(s.identity(), "TPU metering is off (EnergyConfig.tpu_backend)"), []) for s in specs}
    reason = None
    if monitoring is None:
        monitoring, reason = load_tpumonitoring()
    names = []
    if monitoring is not None:
        try:
            names = [str(n) for n in monitoring.list_supported_metrics()]
        except Exception as error:
            monitoring, reason = None, f"tpumonitoring.list_supported_metrics failed: {error}"
    order = ["metric", "estimate"] if config.tpu_backend == "auto" else [config.tpu_backend]
    versions = _versions()
    chosen = {}
    metric_poller = duty_poller = None
    for spec in specs:
        attempts = []
        for choice in order:
            if monitoring is None:
                attempts.append((choice, reason))
                continue
            if choice == "metric":
                metric = find_power_metric(names, config)
                if metric is None:
                    wanted = f"'{config.tpu_power_metric}'" if config.tpu_power_metric else "a metric named '*power*'"
                    attempts.append(("metric", f"tpumonitoring lists no power metric ({wanted} not in {names})"))
                    continue
                if metric_poller is None:
                    metric_poller = PowerPoller(lambda m=metric: (time.time(), _floats(monitoring, m)),
                                                config.poll_interval_s, name="tpu-power")
                chosen[spec.key] = Polled(
                    spec.identity(), f"tpumonitoring power metric '{metric}', integrated", metric_poller, spec.chip,
                    name="tpu_power_metric", method=INTEGRATED_POWER, versions=versions,
                    notes=[f"tpumonitoring does not state the unit of '{metric}': read as watts"],
                    raw={"metric": metric, "unit": "W (assumed)"})
                break
            if DUTY_CYCLE not in names:
                attempts.append(("estimate", f"tpumonitoring lists no '{DUTY_CYCLE}' ({names})"))
                continue
            constants = tpu_power_constants(spec.kind, config)
            if constants["idle_w"] is None or constants["peak_w"] is None:
                attempts.append(("estimate", f"no idle/peak power known for '{spec.kind}' "
                                             f"({constants['source'] or 'not in tpu_power.yaml'}); set "
                                             "EnergyConfig.tpu_idle_w and tpu_peak_w"))
                continue
            if duty_poller is None:
                duty_poller = _DutyCycle(monitoring, config.poll_interval_s)
            duty_poller.constants[spec.chip] = (constants["idle_w"], constants["peak_w"])
            idle, peak = constants["idle_w"], constants["peak_w"]
            chosen[spec.key] = Polled(
                spec.identity(), _because(attempts, f"estimated from {DUTY_CYCLE} and idle/peak chip power"),
                duty_poller.poller, spec.chip, name="tpu_duty_cycle", method=ESTIMATED, versions=versions,
                assumptions={"formula": "P = idle_w + duty_cycle x (peak_w - idle_w), integrated over samples",
                             "idle_w": idle, "peak_w": peak, "source": constants["source"],
                             "generation": constants["generation"]},
                describe=lambda watts, i=idle, p=peak: {
                    "mean_duty_cycle_pct": 100 * (watts - i) / (p - i) if p > i else None},
                raw={"metric": DUTY_CYCLE, "unit": "W (modelled)"})
            break
        if spec.key not in chosen:
            chosen[spec.key] = Unavailable(spec.identity(), "; ".join(f"{c}: {r}" for c, r in attempts), versions)
        chosen[spec.key] = (chosen[spec.key], attempts)
    return chosen


def _because(attempts, what: str) -> str:
    return what if not attempts else f"{what} ({'; '.join(f'{c}: {r}' for c, r in attempts)})"


class _DutyCycle:
    """One poller for every chip of the host: a get_metric call returns all chips' duty cycles."""

    def __init__(self, monitoring, interval_s):
        self.constants: dict[int, tuple[float, float]] = {}
        self.poller = PowerPoller(self._read, interval_s, name="tpu-duty-cycle")
        self._monitoring = monitoring

    def _read(self):
        duty = _floats(self._monitoring, DUTY_CYCLE)
        watts = [duty_cycle_power_w(d, *self.constants[i]) if i in self.constants else 0.0 for i, d in enumerate(duty)]
        return time.time(), watts
