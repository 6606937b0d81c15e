"""Joules per request: the meter's window around each prefill and decode dispatch, split among
the jobs in it in proportion to the decoder layers each computed (a job that exited early
pays for fewer layers). What a reply says (`reply_energy`):

* `measured`: every window was read from a counter or integrated power (RAPL, NVML, ...);
* `estimated`: the meter's estimate (CPU time x a configured power), or, where the meter has
  no figure, the cost model's modelled joules;
* `unavailable`: neither, with the reason; never a silent 0.

`modelled_joules` is the cost model's price of the job's tokens (eval.joules.modelled_entry),
or None without a cost model.
"""

from __future__ import annotations

from greencode_jax.energy.result import ESTIMATED, MEASURED_METHODS, UNAVAILABLE
from greencode_jax.eval.joules import measured_entry, metered_devices, modelled_entry

MEASURED = "measured"


class StepEnergy:
    """Opens a window before a dispatch and shares it among the jobs after it."""

    def __init__(self, meter):
        self.meter = meter
        self.devices, self.reason = metered_devices(meter) if meter is not None else ([], "no energy meter")
        self.totals: dict[str, float] = {}  # joules by reply method, for /metrics

    def begin(self):
        if self.meter is not None and self.devices:
            self.meter.begin("serve-step")

    def end(self, jobs, layers):
        """Closes the window; job i gets a share in proportion to layers[i]."""
        if self.meter is None or not self.devices:
            for job in jobs:
                job.add_energy(None, UNAVAILABLE, self.reason)
            return
        entry = measured_entry(self.meter.end("serve-step"), self.devices, 1)
        if entry["joules"] is None:
            for job in jobs:
                job.add_energy(None, UNAVAILABLE, entry["reason"])
            return
        method = MEASURED if all(m in MEASURED_METHODS for m in entry["method"].split("+")) else ESTIMATED
        self.totals[method] = self.totals.get(method, 0.0) + entry["joules"]
        total = sum(layers)
        for job, share in zip(jobs, layers):
            job.add_energy(entry["joules"] * share / total if total else entry["joules"] / len(jobs), method)


def reply_energy(job, cost, config) -> dict:
    """The reply's `energy` object for a finished job."""
    modelled = modelled_entry(job.exit_layers, cost, config, job.family)
    modelled_joules = modelled["joules"]
    if job.energy_unavailable is None and job.energy_methods:
        method = MEASURED if job.energy_methods == {MEASURED} else ESTIMATED
        return {"joules": job.joules, "method": method, "modelled_joules": modelled_joules}
    if modelled_joules is not None:
        return {"joules": modelled_joules, "method": ESTIMATED, "modelled_joules": modelled_joules,
                "note": f"meter: {job.energy_unavailable}; joules from the cost model"}
    return {"joules": None, "method": UNAVAILABLE, "modelled_joules": None,
            "reason": job.energy_unavailable or "no energy window covered this request"}
