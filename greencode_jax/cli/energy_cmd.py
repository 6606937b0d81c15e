"""`greencode energy probe | calibrate` and `greencode bench energy`.

`register(subparsers)` adds the `energy` command; `register_bench(bench_subparsers)` adds
`bench energy`. Heavy imports (JAX, the model) happen inside the handlers so `--help`
answers at once; user mistakes raise `GreencodeError`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from greencode_jax.cli.config import finite_float
from greencode_jax.errors import GreencodeError
from greencode_jax.locks import output_lock
from greencode_jax.ownership import check_output_file

MAX_DEFAULT_DEPTHS = 8


def _depths(text: str) -> list[int]:
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers of layers such as 1,4,8, got {text!r}")
    if not depths:
        raise argparse.ArgumentTypeError("expected at least two numbers of layers such as 1,4,8")
    return depths


def _energy_config(overrides):
    from greencode_jax.energy import EnergyConfig

    return EnergyConfig().with_overrides(overrides or [])


def cmd_energy_probe(args):
    from greencode_jax.energy import format_probe, probe

    if args.sample_seconds < 0:
        raise GreencodeError(f"--sample-seconds {args.sample_seconds}: expected 0 or more")
    report = probe(_energy_config(args.set), sample_s=args.sample_seconds)
    print(format_probe(report))
    if args.json:
        from greencode_jax.atomic import write_json_output

        write_json_output(args.json, report, "energy-probe")
        print(f"wrote {args.json}")
    return report


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
    import numpy as np

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


def cmd_energy_calibrate(args):
    from greencode_jax.convert import load_model_config

    decode = args.workload == "decode"
    if args.tokens is None:
        args.tokens = 16 if decode else 128
    for name in ("tokens", "batch", "repeats"):
        if getattr(args, name) <= 0:
            raise GreencodeError(f"--{name} {getattr(args, name)}: expected a positive number")
    if args.min_seconds <= 0 or args.idle_seconds < 0:
        raise GreencodeError("--min-seconds must be positive and --idle-seconds 0 or more")
    if args.new_tokens < 2:
        raise GreencodeError(f"--new-tokens {args.new_tokens}: expected 2 or more")
    config = _energy_config(args.set)
    if args.out:  # every argument is checked before the model loads and the measuring starts
        check_output_file(args.out, "cost-model", inputs={"model": args.model})
    model_config = load_model_config(args.model)
    depths = args.depths
    for layers in depths or default_depths(model_config):
        check_depth(layers, model_config, decode)
    with output_lock(args.out) if args.out else contextlib.nullcontext():
        return _calibrate(args, config, depths, decode)


def _calibrate(args, config, depths: list[int] | None, decode: bool):
    import greencode_jax as gc
    from greencode_jax.energy import EnergyMeter, fit_cost_model, window_measure
    from greencode_jax.energy.calibrate import fit_terms, measure_workloads

    model = gc.load_pretrained(args.model, dtype=args.dtype, scan_layers=not decode)
    c = model.config
    depths = depths or default_depths(c)
    if decode:
        from greencode_jax.generate.costs import calibration_workloads

        workloads = calibration_workloads(model, prompt_tokens=args.tokens, new_tokens=args.new_tokens,
                                          batch=args.batch, depths=depths, seed=args.seed)
        workload = (f"decoding {args.batch} x {args.new_tokens} greedy tokens per step after a {args.tokens}-token "
                    f"prompt, by {', '.join(w.label for w in workloads)}")
        shown = [w.label for w in workloads]
    else:
        workload = (f"prefill of {args.batch} x {args.tokens} random tokens per step through the first k layers "
                    "and the exit head")
        steps = prefill_workload(model, args.tokens, args.batch, args.seed)
        shown = [f"depths {depths}"]
    print(f"calibrate: {args.model} ({c.family}, {c.num_layers} layers), {len(shown)} workload(s), "
          f"{args.repeats} interleaved round(s), >= {args.min_seconds} s per window\n  workload: {workload}",
          flush=True)
    meter = EnergyMeter(config)
    try:
        for selection in meter.selections:
            b = selection.backend
            print(f"  metering {selection.spec.key}: {b.method} via {b.name}")
        if args.idle_seconds > 0:
            meter.measure_idle(args.idle_seconds)
        if decode:
            samples = measure_workloads(meter, workloads, args.repeats, args.min_seconds, args.idle_seconds > 0,
                                        report=_print_sample)
            model_fit = fit_terms(samples, workload=workload)
        else:
            measure = window_measure(meter, steps, args.min_seconds, above_idle=args.idle_seconds > 0)
            model_fit = fit_cost_model(_printing(measure), depths, args.repeats, workload)
    finally:
        meter.close()
    print_fit(model_fit, model)
    if args.out:
        from greencode_jax.atomic import write_json_output

        from greencode_jax.convert.fingerprint import model_fingerprint
        from greencode_jax.energy.cost_model import identity

        # num_layers and architecture: what readers check the fit against (energy/cost_model.py)
        record = {"model": str(args.model), **identity(c, model_fingerprint(model)), "workload_kind": args.workload,
                  "depths": depths, "tokens": args.tokens, "new_tokens": args.new_tokens if decode else None,
                  "batch": args.batch, "dtype": args.dtype, "energy_config": dataclasses.asdict(config),
                  **model_fit.to_dict()}
        write_json_output(args.out, record, "cost-model", inputs={"model": args.model})
        print(f"wrote {args.out}")
    return model_fit


def print_fit(fit, model=None):
    """The fitted coefficients with their 95 % intervals, R², and the head's cost beside its bytes."""
    def term(name, label):
        value = getattr(fit, name)
        low_high = fit.intervals.get(name)
        ci = f" [{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else ""
        return f"{value:.5g}{ci} {label}"

    parts = [term("a_j", "")] + [term(name, label) for t, name, label in (
        ("layers", "b_j_per_layer", "x layers"), ("heads", "c_j_per_head", "x head evaluations"),
        ("decisions", "d_j_per_decision", "x decisions")) if t in fit.terms]
    r2 = "undefined" if fit.r2 is None else f"{fit.r2:.4f}"
    print(f"  fit ({fit.method}): J/token = " + " + ".join(p.strip() for p in parts) + f"   (95 % intervals)  R² = {r2}"
          + ("" if fit.reliable else "  UNRELIABLE"))
    if "heads" in fit.terms and fit.b_j_per_layer > 0 and model is not None:
        from greencode_jax.models.model import param_arrays

        layer_bytes = sum(x.nbytes for x in param_arrays(model.block(0)))
        head_bytes = sum(x.nbytes for x in param_arrays(*model.exit_head_modules()))
        print(f"  an LM-head evaluation costs {fit.c_j_per_head / fit.b_j_per_layer:.2f} layers; its weights are "
              f"{head_bytes / layer_bytes:.2f} layers' bytes")
    print("  residuals (J/token): " + ", ".join(f"{r:+.3g}" for r in fit.residuals))
    for warning in fit.warnings:
        print(f"  warning: {warning}")


def _print_sample(sample):
    figure = "no figure" if sample.energy_j is None else f"{sample.joules_per_token:.6g} J/token"
    note = f": {sample.note}" if sample.note else ""
    print(f"  {sample.workload:<26} {sample.layers:5.2f} layers {sample.heads:5.2f} heads {sample.decisions:5.2f} "
          f"decisions: {figure} ({sample.method}{note})", flush=True)


def _printing(measure):
    def wrapped(layers):
        sample = measure(layers)
        figure = "no figure" if sample.energy_j is None else f"{sample.joules_per_token:.6g} J/token"
        note = f": {sample.note}" if sample.note else ""
        print(f"  {layers:3d} layers: {sample.tokens} tokens, {figure} ({sample.method}{note})", flush=True)
        return sample
    return wrapped


def cmd_bench_energy(args):
    from greencode_jax.bench.energy import run_bench_energy
    from greencode_jax.cli.bench_cmd import echo, write_figures

    results = run_bench_energy(windows=args.windows, progress=echo)
    write_figures(args.json, results)
    return results


def _add_set(parser):
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="EnergyConfig field override, repeatable: e.g. cpu_backend=estimate, watts_per_core=12, "
                             "gpu_backend=power, tpu_idle_w=60")


def register(subparsers):
    """Adds `energy probe` and `energy calibrate` to the `greencode` command's subparsers."""
    energy = subparsers.add_parser("energy", help="energy metering: what this machine can measure; "
                                   "per-layer cost model")
    sub = energy.add_subparsers(dest="energy", required=True, metavar="ENERGY_COMMAND")

    p = sub.add_parser("probe", help="what this machine can measure, per device and method, and why not")
    p.add_argument("--sample-seconds", type=finite_float, default=0.5,
                   help="length of a live sample window per device (default 0.5; 0 skips it)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    _add_set(p)
    p.set_defaults(func=cmd_energy_probe)

    p = sub.add_parser("calibrate", help="fit joules/token = a + b x layers computed, under the meter")
    p.add_argument("model", help="greencode checkpoint or Hugging Face model directory")
    p.add_argument("--depths", type=_depths, default=None,
                   help="numbers of decoder layers computed, e.g. 1,4,8,12 (default: each exit layer + 1, "
                        f"at most {MAX_DEFAULT_DEPTHS})")
    p.add_argument("--workload", choices=["decode", "prefill"], default="decode",
                   help="decode (default): KV-cached decoding with every token exiting at the depth, so depths "
                        "must be exit layers + 1; prefill: a forward through the first k layers, any k")
    p.add_argument("--tokens", type=int, default=None,
                   help="prompt length per step (default 16 for decode, 128 for prefill)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per step (decode workload; default 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="windows per depth, depths interleaved (default 3)")
    p.add_argument("--min-seconds", type=finite_float, default=2.0,
                   help="each window repeats the step at least this long (default 2; counters refresh ~0.1 s)")
    p.add_argument("--idle-seconds", type=finite_float, default=0.0,
                   help="measure idle power this long first and fit the energy above idle (default 0: total)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--out", default=None, help="write the fit and its samples to this JSON file")
    _add_set(p)
    p.set_defaults(func=cmd_energy_calibrate)
    return energy


def register_bench(bench_subparsers):
    """Adds `bench energy` to the `greencode bench` subparsers."""
    p = bench_subparsers.add_parser("energy", help="energy meter overhead per window, per backend, vs the 1 ms bound")
    p.add_argument("--windows", type=int, default=1000, help="empty windows per round (default 1000; 5 rounds)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_energy)
    return p
