"""`greencode energy probe | calibrate` and `greencode bench energy`.

`register(subparsers)` adds the `energy` command; `register_bench(bench_subparsers)` adds
`bench energy`. Heavy imports (JAX, the model) happen inside the handlers so `--help`
answers at once; user mistakes raise `GreencodeError`.
"""

from __future__ import annotations

import argparse

from greencode_jax.cli.args import comma_list
from greencode_jax.cli.config import finite_float
from greencode_jax.errors import GreencodeError

MAX_DEFAULT_DEPTHS = 8  # energy/calibrate_run.py's; repeated here so that `--help` imports no JAX


def _depths(text: str) -> list[int]:
    depths = comma_list(text, int, expected="comma-separated numbers of layers such as 1,4,8")
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


def cmd_energy_calibrate(args):
    from greencode_jax.energy.calibrate_run import calibrate

    return calibrate(args.model, depths=args.depths, workload=args.workload, tokens=args.tokens,
                     new_tokens=args.new_tokens, batch=args.batch, repeats=args.repeats, min_seconds=args.min_seconds,
                     idle_seconds=args.idle_seconds, dtype=args.dtype, seed=args.seed, out=args.out,
                     energy_overrides=args.set)


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
