"""Per-layer cost model: joules per token = a + b x (decoder layers computed), by least squares.

`fit_cost_model(measure, depths)` calls `measure(layers)` for each depth (and repeat)
and fits the line; `window_measure(meter, workload)` builds such a `measure` from a
workload run under an `EnergyMeter`. The workload is a parameter so the generation code
can supply decoding with a fixed exit; `greencode energy calibrate` uses prefill of the
first k layers until then.
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


@dataclasses.dataclass(frozen=True)
class CostSample:
    layers: int  # decoder layers computed per token
    energy_j: float | None
    tokens: int
    method: str  # "measured" (counters / integrated power), "estimated" or "unavailable"
    devices: tuple[str, ...] = ()  # whose joules are summed
    note: str = ""

    @property
    def joules_per_token(self) -> float | None:
        return None if self.energy_j is None else self.energy_j / self.tokens

    @classmethod
    def from_window(cls, layers: int, result: WindowResult, tokens: int, devices=None,
                    above_idle: bool = False) -> "CostSample":
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
            return cls(layers, None, tokens, UNAVAILABLE, tuple(devices), why)
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
        return cls(layers, energy, tokens, methods.pop(), tuple(devices))


@dataclasses.dataclass
class CostModel:
    a_j: float  # joules per token at zero layers: embedding, exit head and fixed overheads
    b_j_per_layer: float  # joules per token for each decoder layer computed
    r2: float | None  # 1 - SS_res / SS_tot; None when every sample is equal
    residuals: list[float]  # observed - fitted J/token, one per used sample
    samples: list[CostSample]
    method: str  # "measured" or "estimated": never a mix
    warnings: list[str] = dataclasses.field(default_factory=list)
    workload: str = ""

    def predict(self, layers) -> float:
        return self.a_j + self.b_j_per_layer * layers

    def to_dict(self) -> dict:
        return {"formula": "joules_per_token = a_j + b_j_per_layer * layers", "a_j": self.a_j,
                "b_j_per_layer": self.b_j_per_layer, "r2": self.r2, "residuals": self.residuals,
                "method": self.method, "workload": self.workload, "warnings": self.warnings,
                "samples": [{**dataclasses.asdict(s), "joules_per_token": s.joules_per_token} for s in self.samples]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


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
    used = [s for s in samples if s.energy_j is not None]
    warnings = [f"{s.layers} layers: sample dropped ({s.note})" for s in samples if s.energy_j is None]
    methods = sorted({s.method for s in used})
    if len(methods) > 1:
        raise GreencodeError(f"samples mix {' and '.join(methods)} joules; refusing to fit them together")
    if len({s.layers for s in used}) < 2:
        raise GreencodeError("fewer than two depths gave an energy figure: " + ("; ".join(warnings) or "none given"))
    x = [s.layers for s in used]
    a, b, r2, residuals = fit_line(x, [s.joules_per_token for s in used])
    if len(used) == 2:
        warnings.append("two samples: R² is 1 by construction; use three or more depths or repeats")
    if b < 0:
        warnings.append(f"negative cost per layer (b = {b:.3g} J): noise dominates; run longer windows")
    return CostModel(a, b, r2, residuals, samples, methods[0], warnings, workload)


def window_measure(meter, workload, min_seconds: float = 1.0, above_idle: bool = False,
                   clock=time.perf_counter) -> Callable[[int], CostSample]:
    """A `measure(layers)` that runs `workload(layers) -> (step, tokens_per_step)` under `meter`.

    `step()` runs the work once and returns JAX outputs. One untimed call first keeps
    compilation out of the window; then steps repeat (each blocked on) until
    `min_seconds` pass, so counters that refresh every ~0.1 s see many updates.
    """
    import jax

    # Which devices count is decided once, from what each backend measures when it works.
    measured = [b.key for b in meter.backends if b.method in MEASURED_METHODS]
    devices = measured or [b.key for b in meter.backends if b.method == ESTIMATED]
    if not devices:
        raise GreencodeError("no device can be metered here: see `greencode energy probe`")

    def measure(layers: int) -> CostSample:
        step, tokens_per_step = workload(layers)
        jax.block_until_ready(step())
        name = f"calibrate:{layers}"
        meter.begin(name)
        start, steps, out = clock(), 0, None
        while steps == 0 or clock() - start < min_seconds:
            out = jax.block_until_ready(step())
            steps += 1
        result = meter.end(name, out)
        return CostSample.from_window(layers, result, steps * tokens_per_step, devices, above_idle)

    return measure
