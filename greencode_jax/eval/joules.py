"""The two energy figures of a record, never mixed.

*Measured*: an `EnergyMeter` window around one batch's generation, synchronised at both
ends, summed over the devices chosen once at the start (those measured by a counter or
integrated power; else those with an estimate), divided by the samples in the batch. Its
`method` is the meter's label (counter, integrated_power, estimated, unavailable); a
missing figure is None with its reason, never 0.

*Modelled*: the sum over a sample's generated tokens of the calibrated joules per token,
a + b x (decoder layers computed) with layers = exit layer + 1, from the JSON that
`greencode energy calibrate --out` writes (read and checked by `energy.cost_model.load_cost_model`);
`method` is that cost model's own label ("measured" or "estimated"). Without a cost model the
figure is None with a reason.
"""

from __future__ import annotations

import numpy as np

from greencode_jax.energy.cost_model import joules_per_token
from greencode_jax.energy.result import ESTIMATED, MEASURED_METHODS, UNAVAILABLE
from greencode_jax.generate.costs import sequence_counts

NO_COST_MODEL = ("no cost model given (--cost-model FILE, written by `greencode energy calibrate --out FILE`): "
                 "modelled energy unavailable")


def metered_devices(meter) -> tuple[list[str], str | None]:
    """(device keys whose joules count, reason when there are none): the measured devices,
    else the estimated ones; decided once so no window silently swaps one kind for the other."""
    measured = [b.key for b in meter.backends if b.method in MEASURED_METHODS]
    if measured:
        return measured, None
    estimated = [b.key for b in meter.backends if b.method == ESTIMATED]
    if estimated:
        return estimated, None
    reasons = "; ".join(f"{b.key}: {b.reason}" for b in meter.backends) or "no device to meter"
    return [], f"no device can be metered here ({reasons})"


def measured_entry(result, devices: list[str], share: int, no_device_reason: str | None = None) -> dict:
    """The per-sample measured figure of one window shared by `share` samples."""
    if not devices:
        return {"joules": None, "method": UNAVAILABLE, "reason": no_device_reason or "no device metered"}
    readings = [result.device(key) for key in devices]
    failed = [r for r in readings if r.energy_j is None]
    if failed:
        return {"joules": None, "method": UNAVAILABLE,
                "reason": "; ".join(f"{r.device['key']}: {r.reason}" for r in failed)}
    methods = sorted({r.method for r in readings})
    return {"joules": sum(r.energy_j for r in readings) / share, "method": "+".join(methods), "reason": None}


def modelled_entry(exit_layers, cost: dict | None, config, family: str) -> dict:
    """The modelled figure of one sample: the sum over its tokens of the cost model's price of each
    token's layers, head evaluations and decisions (generate.costs.token_counts, by policy family)."""
    if cost is None:
        return {"joules": None, "method": UNAVAILABLE, "reason": NO_COST_MODEL}
    if config.num_layers != cost["num_layers"]:
        return {"joules": None, "method": UNAVAILABLE,
                "reason": f"the cost model is for a {cost['num_layers']}-layer model; this one has {config.num_layers}"}
    counts = sequence_counts(config, family, exit_layers)
    joules = float(np.sum(joules_per_token(cost, counts[:, 0], counts[:, 1], counts[:, 2])))
    return {"joules": joules, "method": cost["method"], **({} if cost.get("reliable", True) else {"unreliable": True})}
