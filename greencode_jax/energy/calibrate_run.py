"""`greencode energy calibrate` as a library call: choose the workloads and depths, run them under
the meter, fit the cost model (energy/calibrate.py) and write it (energy/cost_model.py).

    fit = calibrate("runs/x/final", out="runs/x/cost_model.json", energy_overrides=["cpu_backend=estimate"])

The `decode` workload (the default) decodes with every token exiting at a depth, so the depths
must be exit layers + 1 and the fit has a term per layer, head evaluation and decision
(generate/costs.py: `calibration_workloads`); the `prefill` workload runs the first k layers and
the exit head for any k and fits a line in layers alone. Progress, the fit and its residuals go
to `log` line by line; both `greencode energy calibrate` and `greencode run` call this.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from greencode_jax.convert import load_model_config, load_pretrained
from greencode_jax.convert.fingerprint import model_fingerprint
from greencode_jax.energy.calibrate import CostModel, fit_cost_model, fit_terms, measure_workloads, window_measure
from greencode_jax.energy.config import EnergyConfig
from greencode_jax.energy.cost_model import KIND, save_cost_model
from greencode_jax.energy.meter import EnergyMeter
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.costs import calibration_workloads
from greencode_jax.locks import output_lock
from greencode_jax.models.model import param_arrays
from greencode_jax.ownership import check_output_file

MAX_DEFAULT_DEPTHS = 8
WORKLOADS = ("decode", "prefill")


def _say(line: str):
    print(line, flush=True)


def check_depth(layers: int, config, decode: bool):
    """A calibration depth (layers computed) that the workload can run on a model of `config`."""
    if not 1 <= layers <= config.num_layers:
        raise GreencodeError(f"depth {layers}: expected a number of layers in 1..{config.num_layers}")
    if decode and layers < config.num_layers and layers - 1 not in config.exit_layers:
        depths = [e + 1 for e in config.exit_layers]
        raise GreencodeError(f"depth {layers}: decoding stops only at an exit layer; this model's exits give "
                             f"depths {depths} (or use --workload prefill)")


def prefill_workload(model, tokens: int, batch: int, seed: int = 0):
    """`workload(layers) -> (step, tokens_per_step)`: prefill of random ids through decoder
    layers 0..layers-1 and the exit head (any depth, exit layer or not)."""
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, tokens), dtype=np.int32)

    def workload(layers: int):
        check_depth(layers, model.config, decode=False)
        return (lambda: model.logits(ids, layer=layers - 1)), batch * tokens

    return workload


def default_depths(config) -> list[int]:
    """Layers computed at each exit (exit layer + 1), thinned to at most MAX_DEFAULT_DEPTHS, ends kept."""
    depths = [layer + 1 for layer in config.exit_layers]
    if len(depths) > MAX_DEFAULT_DEPTHS:
        picks = {round(i * (len(depths) - 1) / (MAX_DEFAULT_DEPTHS - 1)) for i in range(MAX_DEFAULT_DEPTHS)}
        depths = [depths[i] for i in sorted(picks)]
    if len(set(depths)) < 2:
        depths = sorted({1, config.num_layers})
    return depths


def calibrate(model: str | Path, *, depths: Sequence[int] | None = None, workload: str = "decode",
              tokens: int | None = None, new_tokens: int = 32, batch: int = 1, repeats: int = 3,
              min_seconds: float = 2.0, idle_seconds: float = 0.0, dtype: str = "float32", seed: int = 0,
              out: str | Path | None = None, energy_overrides: Sequence[str] = (),
              log: Callable[[str], None] = _say) -> CostModel:
    """Fits the cost model of the checkpoint or Hugging Face directory `model` under the meter
    (`EnergyConfig` with `energy_overrides`, "field=value" each) and returns the fit; with `out`,
    also writes it there (`save_cost_model`, under the output's lock).

    `depths`: layers computed per workload (default: each exit layer + 1, at most
    MAX_DEFAULT_DEPTHS); `tokens`: prompt length (default 16 for decode, 128 for prefill);
    `new_tokens`: decoded tokens per step; `repeats`: windows per workload, interleaved;
    `min_seconds`: each window's least length; `idle_seconds`: idle power measured first, the
    fit then being of the energy above idle. Every argument is checked before the model loads.
    """
    if workload not in WORKLOADS:
        raise GreencodeError(f"workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    decode = workload == "decode"
    if tokens is None:
        tokens = 16 if decode else 128
    for name, value in (("tokens", tokens), ("batch", batch), ("repeats", repeats)):
        if value <= 0:
            raise GreencodeError(f"--{name} {value}: expected a positive number")
    if min_seconds <= 0 or idle_seconds < 0:
        raise GreencodeError("--min-seconds must be positive and --idle-seconds 0 or more")
    if new_tokens < 2:
        raise GreencodeError(f"--new-tokens {new_tokens}: expected 2 or more")
    config = EnergyConfig().with_overrides(list(energy_overrides))
    if out:  # every argument is checked before the model loads and the measuring starts
        check_output_file(out, KIND, inputs={"model": str(model)})
    model_config = load_model_config(model)
    for layers in depths or default_depths(model_config):
        check_depth(layers, model_config, decode)
    settings = dict(workload=workload, tokens=tokens, new_tokens=new_tokens, batch=batch, repeats=repeats,
                    min_seconds=min_seconds, idle_seconds=idle_seconds, dtype=dtype, seed=seed)
    with output_lock(out) if out else contextlib.nullcontext():
        return _calibrate(model, config, list(depths) if depths else None, out, log, **settings)


def _calibrate(path, config: EnergyConfig, depths: list[int] | None, out, log, *, workload: str, tokens: int,
               new_tokens: int, batch: int, repeats: int, min_seconds: float, idle_seconds: float, dtype: str,
               seed: int) -> CostModel:
    decode = workload == "decode"
    model = load_pretrained(path, dtype=dtype, scan_layers=not decode)
    c = model.config
    depths = depths or default_depths(c)
    if decode:
        workloads = calibration_workloads(model, prompt_tokens=tokens, new_tokens=new_tokens, batch=batch,
                                          depths=depths, seed=seed)
        description = (f"decoding {batch} x {new_tokens} greedy tokens per step after a {tokens}-token prompt, "
                       f"by {', '.join(w.label for w in workloads)}")
        shown = [w.label for w in workloads]
    else:
        description = (f"prefill of {batch} x {tokens} random tokens per step through the first k layers and the "
                       "exit head")
        steps = prefill_workload(model, tokens, batch, seed)
        shown = [f"depths {depths}"]
    log(f"calibrate: {path} ({c.family}, {c.num_layers} layers), {len(shown)} workload(s), {repeats} interleaved "
        f"round(s), >= {min_seconds} s per window\n  workload: {description}")
    meter = EnergyMeter(config)
    try:
        for selection in meter.selections:
            b = selection.backend
            log(f"  metering {selection.spec.key}: {b.method} via {b.name}")
        if idle_seconds > 0:
            meter.measure_idle(idle_seconds)
        if decode:
            samples = measure_workloads(meter, workloads, repeats, min_seconds, idle_seconds > 0,
                                        report=lambda sample: log(_sample_line(sample)))
            model_fit = fit_terms(samples, workload=description)
        else:
            measure = window_measure(meter, steps, min_seconds, above_idle=idle_seconds > 0)
            model_fit = fit_cost_model(_logging(measure, log), depths, repeats, description)
    finally:
        meter.close()
    for line in fit_lines(model_fit, model):
        log(line)
    if out:
        save_cost_model(out, model_fit, c, model=path, weights_fingerprint=model_fingerprint(model), settings={
            "workload_kind": workload, "depths": depths, "tokens": tokens,
            "new_tokens": new_tokens if decode else None, "batch": batch, "dtype": dtype,
            "energy_config": dataclasses.asdict(config)})
        log(f"wrote {out}")
    return model_fit


def fit_lines(fit: CostModel, model=None) -> list[str]:
    """The fitted coefficients with their 95 % intervals, R², the head's cost beside its bytes
    (given the model), the residuals and the fit's warnings: one line each."""
    def term(name, label):
        value = getattr(fit, name)
        low_high = fit.intervals.get(name)
        ci = f" [{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else ""
        return f"{value:.5g}{ci} {label}"

    parts = [term("a_j", "")] + [term(name, label) for t, name, label in (
        ("layers", "b_j_per_layer", "x layers"), ("heads", "c_j_per_head", "x head evaluations"),
        ("decisions", "d_j_per_decision", "x decisions")) if t in fit.terms]
    r2 = "undefined" if fit.r2 is None else f"{fit.r2:.4f}"
    lines = [f"  fit ({fit.method}): J/token = " + " + ".join(p.strip() for p in parts)
             + f"   (95 % intervals)  R² = {r2}" + ("" if fit.reliable else "  UNRELIABLE")]
    if "heads" in fit.terms and fit.b_j_per_layer > 0 and model is not None:
        layer_bytes = sum(x.nbytes for x in param_arrays(model.block(0)))
        head_bytes = sum(x.nbytes for x in param_arrays(*model.exit_head_modules()))
        lines.append(f"  an LM-head evaluation costs {fit.c_j_per_head / fit.b_j_per_layer:.2f} layers; its weights "
                     f"are {head_bytes / layer_bytes:.2f} layers' bytes")
    lines.append("  residuals (J/token): " + ", ".join(f"{r:+.3g}" for r in fit.residuals))
    lines.extend(f"  warning: {warning}" for warning in fit.warnings)
    return lines


def _figure(sample) -> str:
    figure = "no figure" if sample.energy_j is None else f"{sample.joules_per_token:.6g} J/token"
    return figure + f" ({sample.method}{f': {sample.note}' if sample.note else ''})"


def _sample_line(sample) -> str:
    return (f"  {sample.workload:<26} {sample.layers:5.2f} layers {sample.heads:5.2f} heads {sample.decisions:5.2f} "
            f"decisions: {_figure(sample)}")


def _logging(measure, log):
    def wrapped(layers):
        sample = measure(layers)
        log(f"  {layers:3d} layers: {sample.tokens} tokens, {_figure(sample)}")
        return sample
    return wrapped
