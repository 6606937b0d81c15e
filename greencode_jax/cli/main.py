"""The `greencode` command.

Heavy imports (JAX, transformers, torch) happen inside each command, so `--help`
answers at once. A `GreencodeError` is printed as one line and exits with status 2; Ctrl-C
(SIGINT) and SIGTERM end with one line and status 130 / 143 (greencode_jax/interrupts.py).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys

from greencode_jax.cli import data_cmd, eval_cmd, rl_cmd, serve_cmd, sweep_cmd, train_cmd
from greencode_jax.cli.args import comma_list
from greencode_jax.cli.bench_cmd import cmd_bench_decode, cmd_bench_forward, register_bench_serve
from greencode_jax.cli.energy_cmd import register as register_energy, register_bench as register_bench_energy
from greencode_jax import interrupts
from greencode_jax.locks import output_lock
from greencode_jax.ownership import check_output_dir, check_output_file, set_command


def _exit_layers(text: str) -> list[int]:
    return comma_list(text, int, expected="comma-separated layer indices such as 3,5,7")


def _learned_kernels(text: str) -> tuple[str, ...]:
    from greencode_jax.generate.policies import LEARNED_KERNELS

    return tuple(comma_list(text, expected=f"a comma-separated subset of {','.join(LEARNED_KERNELS)}", nonempty=True,
                            unique=True, valid=lambda kernels: set(kernels) <= set(LEARNED_KERNELS)))


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MiB, got {text!r}")


def cmd_convert_from_hf(args):
    from greencode_jax.convert import load_hf, resolve_model_dir, save_checkpoint

    inputs = {"src": args.src}
    check_output_dir(args.out, "checkpoint", inputs=inputs, overwrite=args.overwrite)
    with output_lock(args.out):
        model = load_hf(resolve_model_dir(args.src), args.dtype, args.exit_layers)
        out = save_checkpoint(model, args.out, overwrite=args.overwrite, inputs=inputs)
    c = model.config
    print(f"wrote {out}: {c.family}, {c.num_layers} layers, exits {list(c.exit_layers)}, {args.dtype}")


def cmd_export_hf(args):
    from greencode_jax.convert import export_pretrained, load_pretrained

    inputs = {"src": args.src}
    check_output_dir(args.out, "hf-export", inputs=inputs, overwrite=args.overwrite)
    with output_lock(args.out):
        model = load_pretrained(args.src, args.dtype, args.exit_layers)
        out = export_pretrained(model, args.out, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                                inputs=inputs)
    print(f"wrote {out}: config.json + safetensors for transformers' {model.config.to_hf().architectures[0]}")


def _add_torch_device(parser):
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default=None,
                        help="where the transformers reference runs (default: cuda when JAX runs on a GPU, else cpu)")


def cmd_run(args):
    from greencode_jax.cli.pipeline import cmd_run as run_and_print

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # `greencode run a.b=c`: overrides of the default
    run_and_print(config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="greencode", description="greencode-jax: early-exit code LLMs in JAX/Flax that spend less energy "
        "per token. Run `greencode COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: prepare, fine-tune, calibrate, collect rollouts, train the exit "
                       "policy, evaluate, report (default config: the embedded quickstart)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/quickstart.yaml, embedded)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("convert-from-hf", help="Hugging Face model dir or hub id -> greencode checkpoint")
    p.add_argument("src", help="HF model directory (config.json + safetensors or pytorch_model.bin) or hub id")
    p.add_argument("out", help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--exit-layers", type=_exit_layers, default=None,
                   help="0-based decoder layers with an exit, e.g. 3,5,7,9 (default: every layer)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert_from_hf)

    p = sub.add_parser("export-hf", help="greencode checkpoint (or HF dir) -> HF dir for transformers/PyTorch")
    p.add_argument("src", help="greencode checkpoint directory (or a HF model directory)")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype of the export (default: the checkpoint's)")
    p.add_argument("--exit-layers", type=_exit_layers, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="shard the safetensors past this size (5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export_hf)

    data_cmd.register(sub)
    train_cmd.register(sub)
    register_energy(sub)
    rl_cmd.register(sub)
    eval_cmd.register(sub)
    eval_cmd.register_certify(sub)
    serve_cmd.register(sub)
    sweep_cmd.register(sub)

    bench = sub.add_parser("bench", help="benchmarks against the PyTorch reference, measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench_sub.add_parser("forward", help="prefill tokens/s vs transformers PyTorch, and import peak memory")
    p.add_argument("--shape", default=None, help="model shape: opt-125m, opt-350m, llama-160m, llama-1b, "
                   "llama-10m, tiny-opt, tiny-llama (default opt-125m)")
    p.add_argument("--model", default=None, metavar="DIR", help="instead of --shape: a Hugging Face model directory "
                   "or a greencode checkpoint (exported for the transformers reference)")
    p.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up (median reported)")
    _add_torch_device(p)
    p.add_argument("--skip-memory", action="store_true", help="skip the import peak-memory measurement")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_forward)
    p = bench_sub.add_parser("decode", help="early-exit decode tokens/s vs transformers generate and the memory floor")
    p.add_argument("--shape", default=None, help="model shape (see bench forward; default opt-125m)")
    p.add_argument("--model", default=None, metavar="DIR", help="instead of --shape: a Hugging Face model directory "
                   "or a greencode checkpoint, with its own exits unless --exit-layers")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--new", type=int, default=15, help="new tokens (default 15)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and compute on both sides (default float32; bfloat16 for the GPU figures)")
    p.add_argument("--exit-layers", type=_exit_layers, default=None,
                   help="the model's exit layers, 0-based, e.g. 3,7,11 (default: every layer, the costliest for "
                        "Learned, which decides at each)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (medians reported)")
    p.add_argument("--learned-kernels", type=_learned_kernels, default=None, metavar="K[,K]",
                   help="Learned's MLP as compiled by XLA ('xla') and/or as two fused Pallas kernels ('pallas'); "
                        "default: both on a GPU, xla elsewhere (off a GPU the kernel is interpreted: not a timing)")
    _add_torch_device(p)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace one generate of Full(), the skip path and Learned with JAX's profiler: "
                        "DIR/<policy>.perfetto.json.gz (open in ui.perfetto.dev) and each device's kernels per token")
    p.set_defaults(func=cmd_bench_decode)
    data_cmd.register_bench(bench_sub)
    train_cmd.register_bench(bench_sub)
    register_bench_energy(bench_sub)
    rl_cmd.register_bench(bench_sub)
    eval_cmd.register_bench(bench_sub)
    register_bench_serve(bench_sub)
    return parser


JSON_KINDS = {"energy": "energy-probe"}  # what each command's --json FILE holds (default: benchmark figures)


def _end_now(status: int):
    """Ends the process after the atexit handlers, skipping the interpreter's teardown: a
    KeyboardInterrupt that landed inside XLA (a compile cut short) leaves its thread pools with
    work that crashes that teardown (a segfault, status 139, in 3 of 4 interrupted evaluations)."""
    interrupts.ignore()
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv=None) -> int:
    """The `greencode` command; `argv` None: this process is the command (an interrupt that was
    not at a safe point then ends it at once, see `_end_now`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(a.startswith("-") for a in extra):
        args.overrides += extra  # overrides after an option: `finetune C x.y=1 --no-progress x.z=2`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from greencode_jax.errors import GreencodeError

    interrupts.reset()
    previous = interrupts.install()
    set_command(" ".join(filter(None, (args.command, getattr(args, "energy", None), getattr(args, "bench", None)))))
    stop = None
    try:
        if getattr(args, "json", None):  # a --json FILE is checked before the work, not after it
            check_output_file(args.json, JSON_KINDS.get(args.command, "benchmark"))
        args.func(args)
    except interrupts.Interrupted as error:
        stop = error
    except GreencodeError as error:
        if interrupts.received() is None:
            print(f"greencode: error: {error}", file=sys.stderr)
            return 2
        stop = interrupts.interrupted()  # an error made of the interrupt on its way out
    except KeyboardInterrupt:
        stop = interrupts.interrupted()
    except Exception:
        if interrupts.received() is None:
            raise
        stop = interrupts.interrupted()  # a library turned the KeyboardInterrupt into another exception
    finally:
        if argv is None:
            interrupts.ignore()  # ending: a further signal must not cut the line or kill the teardown
        else:
            interrupts.restore(previous)
    if stop is None:
        return 0
    print(f"greencode: {stop}", file=sys.stderr)
    if argv is None and not stop.at_safe_point:
        _end_now(stop.exit_status)
    return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
