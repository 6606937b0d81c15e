"""The cost model file `greencode energy calibrate --out FILE` writes: its one writer and its one reader.

    joules per token = a_j + b_j_per_layer x decoder layers computed

Besides the fit (`CostModel.to_dict`) the file records what it was fitted on: `num_layers`,
`architecture` (family, layer count, widths, heads, vocabulary: what the cost of a layer
depends on) and, for information only, `weights_fingerprint`. `evaluate` (modelled joules),
the energy reward of `train-policy` and `greencode run` read it through `load_cost_model`,
which refuses a fit made for another layer count or architecture; `save_cost_model` writes it
(energy/calibrate_run.py, after a calibration).
"""

from __future__ import annotations

import math

from greencode_jax.atomic import write_json_output
from greencode_jax.energy.calibrate import RELIABLE_R2
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import read_json_mapping

ARCHITECTURE_FIELDS = ("family", "num_layers", "hidden_size", "vocab_size", "num_heads", "num_kv_heads",
                       "intermediate_size", "head_dim")
METHODS = ("measured", "estimated")
HOW_TO_MAKE = "write one with `greencode energy calibrate MODEL --out FILE`"
KIND = "cost-model"  # the output kind its manifest record names (ownership.py)


def architecture(config) -> dict:
    """What the cost per layer depends on, from a `ModelConfig` (or any object with its fields)."""
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}


def identity(config, weights_fingerprint: str | None = None) -> dict:
    """The fields a cost model file records about the model it was fitted on."""
    return {"num_layers": int(config.num_layers), "architecture": architecture(config),
            "weights_fingerprint": weights_fingerprint}


def save_cost_model(path, fit, config, *, model, weights_fingerprint: str | None = None,
                    settings: dict | None = None) -> dict:
    """Writes `fit` (a `calibrate.CostModel`) to `path` as the JSON `load_cost_model` reads: the
    model it was fitted on (`model`, its path, and the `identity` of `config`), the calibration's
    `settings` (workload, depths, sizes, energy config), then the fit. Returns the record."""
    # num_layers and architecture: what load_cost_model checks the fit against
    record = {"model": str(model), **identity(config, weights_fingerprint), **(settings or {}), **fit.to_dict()}
    write_json_output(path, record, KIND, inputs={"model": str(model)})
    return record


def load_cost_model(path, model: dict, *, what: str = "cost model") -> dict:
    """The cost model at `path`, checked against `model` (an `architecture` dict, or the subset
    of it a rollout store records: num_layers at least): the file's fields, with a_j and
    b_j_per_layer as floats and `path` added. `what` names the setting in messages
    (e.g. "--cost-model", "rl.cost_model")."""
    where = f"{what} {path}"
    try:
        data = read_json_mapping(path, "cost model", HOW_TO_MAKE)
    except GreencodeError as error:
        raise GreencodeError(f"{what} {error}") from None
    for key in ("a_j", "b_j_per_layer"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GreencodeError(f"{where}: field {key!r} is {value!r}, expected a number "
                                 "(joules per token = a_j + b_j_per_layer x layers)")
    if data.get("method") not in METHODS:
        raise GreencodeError(f"{where}: field 'method' is {data.get('method')!r}, expected 'measured' or 'estimated'")
    layers = data.get("num_layers")
    if layers is None:
        raise GreencodeError(f"{where}: records no 'num_layers' (the model it was fitted on), so it cannot be "
                             f"matched to this one; {HOW_TO_MAKE}")
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise GreencodeError(f"{where}: field 'num_layers' is {layers!r}, expected an integer")
    if layers != model["num_layers"]:
        raise GreencodeError(f"{where}: fitted on a model of {layers} layers, but this model has "
                             f"{model['num_layers']}; calibrate this model ({HOW_TO_MAKE})")
    recorded = data.get("architecture")
    if recorded is not None and not isinstance(recorded, dict):
        raise GreencodeError(f"{where}: field 'architecture' is {recorded!r}, expected a mapping of "
                             f"{', '.join(ARCHITECTURE_FIELDS)}")
    # Only the architecture: the cost of a layer does not depend on its weights, so a fit made on
    # another checkpoint of the same architecture (on the target GPU, say) is meant to be reused.
    differ = [k for k in ARCHITECTURE_FIELDS if k in (recorded or {}) and k in model and recorded[k] != model[k]]
    if differ:
        theirs = ", ".join(f"{k}={recorded[k]}" for k in differ)
        mine = ", ".join(f"{k}={model[k]}" for k in differ)
        raise GreencodeError(f"{where}: fitted on another architecture ({theirs}) than this model's ({mine}); "
                             f"calibrate this model ({HOW_TO_MAKE})")
    depths = data.get("depths") or []
    if isinstance(depths, list) and depths and all(isinstance(d, int) for d in depths) and \
            max(depths) > model["num_layers"]:
        raise GreencodeError(f"{where}: calibrated at depths up to {max(depths)} layers, but the model has "
                             f"{model['num_layers']}; calibrate this model")
    terms = {}
    for key in ("c_j_per_head", "d_j_per_decision"):  # a line in layers alone (older fits) prices neither
        value = data.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GreencodeError(f"{where}: field {key!r} is {value!r}, expected a number")
        terms[key] = float(value)
    r2 = data.get("r2")
    reliable = data.get("reliable")
    if not isinstance(reliable, bool):  # written before the field existed: judged as fit_terms judges
        reliable = isinstance(r2, (int, float)) and r2 >= RELIABLE_R2 and data["b_j_per_layer"] > 0
    return {**data, "a_j": float(data["a_j"]), "b_j_per_layer": float(data["b_j_per_layer"]), **terms,
            "reliable": reliable, "path": str(path)}


def joules_per_token(cost: dict, layers, heads=1.0, decisions=0.0):
    """The priced counts of one token (generate/costs.py counts them)."""
    return (cost["a_j"] + cost["b_j_per_layer"] * layers + cost.get("c_j_per_head", 0.0) * heads
            + cost.get("d_j_per_decision", 0.0) * decisions)


def describe(cost: dict) -> str:
    """The fit in one line, its reliability included: what every report of modelled joules shows."""
    text = f"J/token = {cost['a_j']:.6g} + {cost['b_j_per_layer']:.6g} x layers"
    if cost.get("c_j_per_head"):
        text += f" + {cost['c_j_per_head']:.6g} x head evaluations"
    if cost.get("d_j_per_decision"):
        text += f" + {cost['d_j_per_decision']:.6g} x decisions"
    r2 = cost.get("r2")
    text += f" (R² {r2:.3f})" if isinstance(r2, (int, float)) else ""
    if not cost.get("reliable", True):
        text += f"; UNRELIABLE: the fit explains too little of what was measured (R² below {RELIABLE_R2})"
    return text
