"""`greencode bench forward` and `greencode bench decode` (their parsers are in main.py's
build_parser), and what every `bench` command does with its figures: print them as they come
(`echo`) and write them to `--json FILE` (`write_figures`).

The benchmarks themselves are in greencode_jax.bench; they load JAX, so each handler imports its
benchmark when it runs and `--help` answers at once.
"""

from __future__ import annotations

import functools

from greencode_jax.atomic import write_json_output

echo = functools.partial(print, flush=True)  # a benchmark's progress lines, shown as they come


def write_figures(path: str | None, results: dict):
    """A benchmark's figures to `--json FILE`, when one was given."""
    if path:
        write_json_output(path, results, "benchmark")


def cmd_bench_forward(args) -> dict:
    from greencode_jax.bench.forward import format_bench_forward, run_bench_forward

    results = run_bench_forward(shape=args.shape, model=args.model, tokens=args.tokens, batch=args.batch,
                                dtype=args.dtype, repeats=args.repeats, torch_device=args.torch_device,
                                skip_memory=args.skip_memory, progress=echo)
    print(format_bench_forward(results))
    write_figures(args.json, results)
    return results


def cmd_bench_decode(args) -> dict:
    from greencode_jax.bench.decode import run_bench_decode
    from greencode_jax.bench.decode_profile import profile_decode
    from greencode_jax.bench.decode_report import format_bench_decode

    run = run_bench_decode(shape=args.shape, model=args.model, prompt=args.prompt, new=args.new, dtype=args.dtype,
                           exit_layers=args.exit_layers, repeats=args.repeats, learned_kernels=args.learned_kernels,
                           torch_device=args.torch_device, progress=echo)
    print(format_bench_decode(run.results, run.hf_bound))
    write_figures(args.json, run.results)  # the timings are kept even if tracing fails
    if args.profile:
        profile_decode(run, args.profile, progress=echo)
        write_figures(args.json, run.results)
    return run.results


def cmd_bench_serve(args) -> dict:
    from greencode_jax.bench.serve import format_bench_serve, run_bench_serve

    results = run_bench_serve(args.checkpoint, policy_dir=args.policy, requests=args.requests,
                              max_tokens=args.max_tokens, slots=args.slots, overrides=args.overrides, progress=echo)
    print(format_bench_serve(results))
    write_figures(args.json, results)
    return results


def register_bench_serve(bench_subparsers):
    p = bench_subparsers.add_parser(
        "serve", help="the completion server at concurrency 1, 4, 16 vs one generate per request",
        description="Starts `greencode serve` on loopback, streams a bounded set of requests at concurrency 1, 4 "
                    "and 16, then runs the GREEN-CODE-shaped baseline (one request at a time, one generate each) "
                    "on the same model: requests/s, output tokens/s, TTFT and ITL p50/p99, joules per token. "
                    "Without CHECKPOINT: the quickstart's model shape at random weights.")
    p.add_argument("checkpoint", nargs="?", default=None, help="greencode checkpoint or Hugging Face model directory")
    p.add_argument("--policy", default=None, metavar="DIR", help="a learned policy: every request runs it, at its "
                   "certified threshold when certify.json is beside it (default: full and two fixed exits in turn)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--slots", type=int, default=16, help="server slots (default 16)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="serve.field=value overrides for the server")
    p.set_defaults(func=cmd_bench_serve)
