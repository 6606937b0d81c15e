"""The cost model: joules per token, fitted by least squares on workloads run under the meter.

    joules_per_token = a + b x layers + c x head evaluations + d x decisions

`layers` are the decoder layers a token computed, `head evaluations` how often the LM head ran
for it (a Confidence policy runs it at every decision it reaches), `decisions` the exit
decisions it paid for (a conditional and the policy's own work each). Decoding workloads that
vary the three independently (generate/costs.py: `calibration_workloads`) are measured in
interleaved rounds (`measure_workloads`) and fitted (`fit_terms`), with a 95 % confidence
interval per coefficient and R²; a fit with a low R² is marked unreliable, and every report of
its joules says so. A prefill workload measures layers alone (`fit_cost_model`, the line
a + b x layers). The energy package prices; what a token counts is generation's business.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import numpy as np

from greencode_jax.energy.result import ESTIMATED, MEASURED_METHODS, WindowResult
from greencode_jax.errors import GreencodeError

MEASURED, UNAVAILABLE = "measured", "unavailable"


TERMS = ("layers", "heads", "decisions")
RELIABLE_R2 = 0.5  # a fit explaining less of the variance than this is reported as unreliable


@dataclasses.dataclass(frozen=True)
class CostSample:
    layers: float  # decoder layers computed per token (a mean over the workload's tokens)
    energy_j: float | None
    tokens: int
    method: str  # "measured" (counters / integrated power), "estimated" or "unavailable"
    devices: tuple[str, ...] = ()  # whose joules are summed
    note: str = ""
    heads: float = 1.0  # LM-head evaluations per token
    decisions: float = 0.0  # exit decisions per token
    workload: str = ""  # which workload (a policy) produced it

    @property
    def joules_per_token(self) -> float | None:
        return None if self.energy_j is None else self.energy_j / self.tokens

    def counts(self, terms=TERMS) -> list[float]:
        return [getattr(self, term) for term in terms]

    @classmethod
    def from_window(cls, layers: int, result: WindowResult, tokens: int, devices=None,
                    above_idle: bool = False, **counts) -> "CostSample":
        """Sums the joules of `devices` (keys); by default the measured devices, or the estimated
        ones if none is measured. Fix `devices` up front (as `window_measure` does) so that a
        measured device failing in one window drops that sample instead of silently swapping
        in an estimate.
        """
        if devices is None:
            measured = [d for d in result.devices if d.method in MEASURED_METHODS]
            devices = [d.device["key"] for d in (measured or [d for d in result.devices if d.method == ESTIMATED])]
        chosen = [result.device(key) for key in devices]
        failed = [d for d in chosen if d.energy_j is None]
        if not chosen or failed:
            why = "; ".join(f"{d.device['key']}: {d.reason}" for d in failed) or "no device gave a figure"
            return cls(layers, None, tokens, UNAVAILABLE, tuple(devices), why, **counts)
        methods = {MEASURED if d.method in MEASURED_METHODS else ESTIMATED for d in chosen}
        if len(methods) > 1:
            raise GreencodeError(f"devices {list(devices)} mix measured and estimated joules; pick one kind")
        if above_idle:
            if any(d.energy_above_idle_j is None for d in chosen):
                raise GreencodeError("above-idle energy asked for, but no idle baseline was measured "
                                     "(EnergyMeter.measure_idle)")
            energy = sum(d.energy_above_idle_j for d in chosen)
        else:
            energy = sum(d.energy_j for d in chosen)
        return cls(layers, energy, tokens, methods.pop(), tuple(devices), **counts)


@dataclasses.dataclass
class CostModel:
    a_j: float  # joules per token with nothing computed: embedding, K/V propagation, fixed overheads
    b_j_per_layer: float  # joules per token for each decoder layer computed
    r2: float | None  # 1 - SS_res / SS_tot; None when every sample is equal
    residuals: list[float]  # observed - fitted J/token, one per used sample
    samples: list[CostSample]
    method: str  # "measured" or "estimated": never a mix
    warnings: list[str] = dataclasses.field(default_factory=list)
    workload: str = ""
    c_j_per_head: float = 0.0  # joules per LM-head evaluation (0 and not fitted: a line in layers alone)
    d_j_per_decision: float = 0.0  # joules per exit decision (the same)
    terms: tuple = ("layers",)  # the counts the fit priced besides the intercept
    intervals: dict = dataclasses.field(default_factory=dict)  # coefficient -> [low, high], 95 %

    @property
    def reliable(self) -> bool:
        return self.r2 is not None and self.r2 >= RELIABLE_R2 and self.b_j_per_layer > 0

    def predict(self, layers, heads=1.0, decisions=0.0):
        return self.a_j + self.b_j_per_layer * layers + self.c_j_per_head * heads + self.d_j_per_decision * decisions

    def formula(self) -> str:
        names = {"layers": "b_j_per_layer * layers", "heads": "c_j_per_head * heads",
                 "decisions": "d_j_per_decision * decisions"}
        return "joules_per_token = a_j + " + " + ".join(names[t] for t in self.terms)

    def to_dict(self) -> dict:
        return {"formula": self.formula(), "a_j": self.a_j, "b_j_per_layer": self.b_j_per_layer,
                "c_j_per_head": self.c_j_per_head, "d_j_per_decision": self.d_j_per_decision,
                "terms": list(self.terms), "confidence_intervals_95": self.intervals, "r2": self.r2,
                "reliable": self.reliable, "residuals": self.residuals, "method": self.method,
                "workload": self.workload, "warnings": self.warnings,
                "samples": [{**dataclasses.asdict(s), "joules_per_token": s.joules_per_token} for s in self.samples]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


COEFFICIENTS = {"intercept": "a_j", "layers": "b_j_per_layer", "heads": "c_j_per_head",
                "decisions": "d_j_per_decision"}


def fit_terms(samples: list[CostSample], terms=TERMS, workload: str = "") -> CostModel:
    """Least squares J/token = a + Σ coefficient x count over `terms`, with 95 % intervals (t
    distribution, from the residual variance) and R²."""
    from scipy.stats import t as student_t

    used = [s for s in samples if s.energy_j is not None]
    warnings = [f"{s.workload or f'{s.layers:g} layers'}: sample dropped ({s.note})" for s in samples
                if s.energy_j is None]
    methods = sorted({s.method for s in used})
    if len(methods) > 1:
        raise GreencodeError(f"samples mix {' and '.join(methods)} joules; refusing to fit them together")
    terms = [t for t in terms if len({getattr(s, t) for s in used}) > 1]  # a count that never varies: no price
    if "layers" not in terms:
        raise GreencodeError("fewer than two depths gave an energy figure: " + ("; ".join(warnings) or "none given"))
    design = np.array([[1.0, *s.counts(terms)] for s in used])
    y = np.array([s.joules_per_token for s in used])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise GreencodeError(f"the workloads do not vary {', '.join(terms)} independently; no fit")
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    unconstrained = coefficients.copy()
    names = ["intercept", *terms]
    negative = [i for i, name in enumerate(names) if name in ("heads", "decisions") and coefficients[i] < 0]
    if negative:  # a price cannot be negative: refit with those terms held at zero or above
        from scipy.optimize import lsq_linear

        lower = np.full(len(names), -np.inf)
        lower[[i for i, name in enumerate(names) if name in ("heads", "decisions")]] = 0.0
        coefficients = lsq_linear(design, y, bounds=(lower, np.full(len(names), np.inf)), method="bvls").x
        for i in negative:
            warnings.append(f"{COEFFICIENTS[names[i]]} came out negative ({unconstrained[i]:.3g}) and is fitted at "
                            f"{coefficients[i]:.3g}: a price is not below zero (what it prices costs less than this "
                            "calibration can tell apart)")
    residuals = y - design @ coefficients
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = None if total == 0 else 1.0 - float(np.sum(residuals**2)) / total
    free = len(y) - design.shape[1]
    intervals = {}
    if free > 0:
        variance = float(np.sum(residuals**2)) / free
        errors = np.sqrt(np.diag(variance * np.linalg.inv(design.T @ design)))
        width = student_t.ppf(0.975, free) * errors
        for name, value, half in zip(names, coefficients, width):
            low = float(value - half)
            intervals[COEFFICIENTS[name]] = [max(low, 0.0) if name in ("heads", "decisions") else low,
                                             float(value + half)]
    else:
        warnings.append("as many coefficients as samples: no confidence interval; use more repeats")
    fitted = dict(zip(["a_j", *(COEFFICIENTS[t] for t in terms)], map(float, coefficients)))
    model = CostModel(fitted["a_j"], fitted.get("b_j_per_layer", 0.0), r2, [float(r) for r in residuals], list(samples),
                      methods[0], warnings, workload, fitted.get("c_j_per_head", 0.0),
                      fitted.get("d_j_per_decision", 0.0), tuple(terms), intervals)
    if model.b_j_per_layer < 0:
        warnings.append(f"negative cost per layer (b = {model.b_j_per_layer:.3g} J): noise dominates; run longer "
                        "windows")
    if not model.reliable:
        warnings.append(f"R² = {'undefined' if r2 is None else f'{r2:.3f}'}: the fit explains too little of what was "
                        f"measured (below {RELIABLE_R2}); its joules are unreliable")
    return model


def fit_line(x, y) -> tuple[float, float, float | None, list[float]]:
    """Least squares y = a + b x: (a, b, R², residuals)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - (a + b * x)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = None if total == 0 else 1.0 - float(np.sum(residuals**2)) / total
    return float(a), float(b), r2, [float(r) for r in residuals]


def fit_cost_model(measure: Callable[[int], CostSample], depths, repeats: int = 1, workload: str = "") -> CostModel:
    """Calls `measure(layers)` for every depth, `repeats` rounds (depths interleaved so drift
    spreads over all of them), and fits J/token = a + b x layers."""
    depths = list(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0 for d in depths):
        raise GreencodeError(f"depths {depths}: expected positive numbers of layers, e.g. 1,4,8")
    if len(set(depths)) < 2:
        raise GreencodeError(f"depths {depths}: a line needs at least two different depths")
    if repeats < 1:
        raise GreencodeError(f"repeats={repeats}: expected at least 1")
    samples = [measure(int(d)) for _ in range(repeats) for d in depths]
    model = fit_terms(samples, ("layers",), workload)
    if len([s for s in samples if s.energy_j is not None]) == 2:
        model.warnings.append("two samples: R² is 1 by construction; use three or more depths or repeats")
    return model


def measure_workloads(meter, workloads, repeats: int, min_seconds: float, above_idle: bool = False,
                      report=None) -> list[CostSample]:
    """Each workload (generate.costs.Workload: a step, its tokens and its counts per token) under
    `meter`, `repeats` interleaved rounds; `report(sample)` after each window."""
    if repeats < 1:
        raise GreencodeError(f"repeats={repeats}: expected at least 1")
    measure = window_measure(meter, lambda w: (w.step, w.tokens), min_seconds, above_idle)
    samples = []
    for _ in range(repeats):
        for w in workloads:
            layers, heads, decisions = w.counts
            sample = dataclasses.replace(measure(w), layers=layers, heads=heads, decisions=decisions,
                                         workload=w.label)
            samples.append(sample)
            if report is not None:
                report(sample)
    return samples


def window_measure(meter, workload, min_seconds: float = 1.0, above_idle: bool = False,
                   clock=time.perf_counter) -> Callable[[int], CostSample]:
    """A `measure(layers)` that runs `workload(layers) -> (step, tokens_per_step)` under `meter`.

    `step()` runs the work once and returns JAX outputs. One untimed call first keeps
    compilation out of the window; then steps repeat (each blocked on) until
    `min_seconds` pass, so counters that refresh every ~0.1 s see many updates.
    """
    import jax  # lazy: keeps energy free of JAX

    # Which devices count is decided once, from what each backend measures when it works.
    measured = [b.key for b in meter.backends if b.method in MEASURED_METHODS]
    devices = measured or [b.key for b in meter.backends if b.method == ESTIMATED]
    if not devices:
        raise GreencodeError("no device can be metered here: see `greencode energy probe`")

    def measure(layers) -> CostSample:
        step, tokens_per_step = workload(layers)
        jax.block_until_ready(step())
        name = f"calibrate:{getattr(layers, 'label', layers)}"
        meter.begin(name)
        start, steps, out = clock(), 0, None
        while steps == 0 or clock() - start < min_seconds:
            out = jax.block_until_ready(step())
            steps += 1
        result = meter.end(name, out)
        return CostSample.from_window(layers, result, steps * tokens_per_step, devices, above_idle)

    return measure
