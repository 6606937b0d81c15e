"""The two energy figures of a record, never mixed.

*Measured*: an `EnergyMeter` window around one batch's generation, synchronised at both
ends, summed over the devices chosen once at the start (those measured by a counter or
integrated power; else those with an estimate), divided by the samples in the batch. Its
`method` is the meter's label (counter, integrated_power, estimated, unavailable); a
missing figure is None with its reason, never 0.

*Modelled*: the sum over a sample's generated tokens of the calibrated joules per token,
a + b x (decoder layers computed) with layers = exit layer + 1, from the JSON that
`greencode energy calibrate --out` writes; `method` is that cost model's own label
("measured" or "estimated"). Without a cost model the figure is None with a reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from greencode_jax.energy.result import ESTIMATED, MEASURED_METHODS, UNAVAILABLE
from greencode_jax.errors import GreencodeError

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


def load_cost_model(path, num_layers: int) -> dict:
    """The calibrated cost model at `path`, checked: {a_j, b_j_per_layer, method, path, ...}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GreencodeError(f"--cost-model {path}: no such file (write one with `greencode energy calibrate "
                             "CHECKPOINT --out FILE`)") from None
    except (OSError, ValueError) as error:
        raise GreencodeError(f"--cost-model {path}: unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise GreencodeError(f"--cost-model {path}: expected the JSON object `greencode energy calibrate --out` writes")
    for key in ("a_j", "b_j_per_layer"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GreencodeError(f"--cost-model {path}: field {key!r} is {value!r}, expected a number "
                                 "(joules per token = a_j + b_j_per_layer x layers)")
    if data.get("method") not in ("measured", "estimated"):
        raise GreencodeError(f"--cost-model {path}: field 'method' is {data.get('method')!r}, expected "
                             "'measured' or 'estimated'")
    depths = data.get("depths") or []
    if depths and isinstance(depths, list) and all(isinstance(d, int) for d in depths) and max(depths) > num_layers:
        raise GreencodeError(f"--cost-model {path}: calibrated at depths up to {max(depths)} layers, but the model "
                             f"has {num_layers}; calibrate this model")
    return {"path": str(path), "a_j": float(data["a_j"]), "b_j_per_layer": float(data["b_j_per_layer"]),
            "method": data["method"], "model": data.get("model"), "workload": data.get("workload"),
            "num_layers": num_layers}


def modelled_entry(exit_layers, cost: dict | None, num_layers: int) -> dict:
    """The modelled figure of one sample: sum over its tokens of a + b x (exit layer + 1)."""
    if cost is None:
        return {"joules": None, "method": UNAVAILABLE, "reason": NO_COST_MODEL}
    if num_layers != cost["num_layers"]:
        return {"joules": None, "method": UNAVAILABLE,
                "reason": f"the cost model is for a {cost['num_layers']}-layer model; this one has {num_layers}"}
    joules = sum(cost["a_j"] + cost["b_j_per_layer"] * (int(e) + 1) for e in exit_layers)
    return {"joules": float(joules), "method": cost["method"]}
