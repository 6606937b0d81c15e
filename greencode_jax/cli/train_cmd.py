"""`greencode finetune CONFIG [section.field=value ...]` and `greencode bench train`.

Wiring (in main.py's build_parser): `train_cmd.register(sub)` and `train_cmd.register_bench(bench_sub)`.
Heavy imports happen inside the handlers, so `--help` answers at once.
"""

from __future__ import annotations

import dataclasses
import sys

from greencode_jax.cli.args import comma_list
from greencode_jax.cli.bench_cmd import write_figures
from greencode_jax.cli.config import finite_float
from greencode_jax.config import FINETUNE_SECTIONS, load_config
from greencode_jax.errors import GreencodeError

def load_finetune_config(path, overrides):
    """YAML + overrides -> (FinetuneConfig, the resolved YAML text). A whole-pipeline config (greencode
    run) also holds the later stages' sections: finetune reads only its own."""
    config = load_config(path, list(overrides), sections=FINETUNE_SECTIONS)
    return config.finetune, config.finetune_yaml


def finetune_config_from_dict(data: dict, source: str):
    """A config mapping (overrides applied) -> (FinetuneConfig, the resolved YAML text)."""
    config = load_config(mapping=data, source=source, sections=FINETUNE_SECTIONS)
    return config.finetune, config.finetune_yaml


def cmd_finetune(args):
    from greencode_jax.train import train

    config, resolved = load_finetune_config(args.config, args.overrides)
    result = train(config, source=str(args.config), resolved_yaml=resolved,
                   progress=False if args.no_progress else None, re_evaluate=args.re_evaluate)
    import jax

    primary = jax.process_index() == 0
    if result.stopped_by is not None:
        raise result.interruption()  # main prints its one line; exit status 130 / 143
    if not primary:
        return result
    print(finish_line(result))
    if result.evaluation:
        print_evaluation(result.evaluation)
    return result


def finish_line(result) -> str:
    """What a finished `finetune` says: the steps this call trained, or that the run had already finished."""
    progress = f"step {result.step}/{result.total_steps}"
    if result.finished_before:
        if not result.evaluated:
            return (f"finetune {result.run_dir.name}: already finished ({progress}); final checkpoint "
                    f"{result.final_checkpoint}; its evaluation, from {result.run_dir / 'eval.json'} "
                    "(--re-evaluate evaluates again):")
        return (f"finetune {result.run_dir.name}: already finished ({progress}); evaluated again in "
                f"{result.seconds:.1f} s into {result.run_dir / 'eval.json'}; final checkpoint "
                f"{result.final_checkpoint}")
    trained = result.step - result.start_step
    rate = f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""
    resumed = f" (resumed at step {result.start_step}, now {progress})" if result.start_step else ""
    return (f"finetune: {trained} steps{resumed} and the evaluation in {result.seconds:.1f} s{rate}; final checkpoint "
            f"{result.final_checkpoint}")


def print_evaluation(ev: dict):
    print(f"  {ev['split']} split, {ev['tokens']:,} next-token predictions; unigram baseline accuracy "
          f"{ev['unigram_accuracy']:.4f}")
    print(f"  {'exit layer':>10}  {'loss':>8}  {'accuracy':>8}")
    for layer, loss in ev["exit_loss"].items():
        print(f"  {layer:>10}  {loss:8.4f}  {ev['exit_accuracy'][layer]:8.4f}")


def register(subparsers):
    p = subparsers.add_parser(
        "finetune", help="train the exits: aggregated exit loss, sharded over a device mesh, resumable",
        description="Fine-tunes an early-exit model (or trains a small one from scratch) with the aggregated exit "
                    "loss. Outputs go to <run.out_dir>/<run.name>/: config.yaml, metrics.jsonl, checkpoints/, "
                    "eval.json and final/ (a greencode checkpoint). Rerunning the same command resumes from the "
                    "latest checkpoint (a finished run prints its eval.json again; --re-evaluate evaluates anew); "
                    "SIGTERM saves one and stops with exit status 143 (Ctrl-C: 130; twice: at once).")
    p.add_argument("config", help="YAML config (see configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.learning_rate=3e-5")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--re-evaluate", action="store_true",
                   help="a run that has already finished is evaluated again (default: its eval.json is printed)")
    p.set_defaults(func=cmd_finetune)


def cmd_bench_train(args):
    from greencode_jax.bench.train import format_bench_train, run_bench_train
    from greencode_jax.bench.zoo import shape_fields

    family, fields = shape_fields(args.shape)
    results = run_bench_train(family, fields, args.shape, batch=args.batch, seq_len=args.seq_len,
                              exits=args.exit_layers, repeats=args.repeats, dtype=args.dtype,
                              layouts=args.layouts, reference=not args.no_reference, torch_device=args.torch_device,
                              peak=None if args.peak_tflops is None else args.peak_tflops * 1e12)
    print(format_bench_train(results))
    write_figures(args.json, results)
    return results


def cmd_bench_heads(args):
    from greencode_jax.bench.heads import format_bench_heads, run_bench_heads

    results = run_bench_heads(model=args.model, shape=args.shape, exit_layers=args.exit_layers, batch=args.batch,
                              seq_len=args.seq_len, repeats=args.repeats)
    print(format_bench_heads(results))
    write_figures(args.json, results)
    return results


def _names(text: str) -> list[str]:
    return comma_list(text, expected="comma-separated names")


def _layers(text: str) -> list[int]:
    return comma_list(text, int, expected="comma-separated layer indices such as 1,2")


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        "train", help="train-step tokens/s vs a PyTorch train step of the same model and loss",
        description="Times our jitted train step (aggregated exit loss, AdamW, clipping), in both layer layouts, "
                    "against a transformers PyTorch train step of the same model with the same loss over the same "
                    "exits and AdamW, interleaved in one process, and prints the ratio of the faster layout and, "
                    "on a GPU or TPU, its model FLOPs utilisation.")
    p.add_argument("--shape", default="opt-125m", help="model shape (see bench forward; default opt-125m)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--exit-layers", type=_layers, default=None, help="exit layers (default: every other layer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype over fp32 master weights (default float32; PyTorch uses autocast for bfloat16)")
    p.add_argument("--layouts", type=_names, default=["stacked", "per_layer"],
                   help="our layer layouts to time, comma-separated (default stacked,per_layer)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per candidate after warm-up (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch step (our figures and MFU only)")
    p.add_argument("--torch-device", choices=["cpu", "cuda"], default=None,
                   help="where the PyTorch step runs (default: cuda when JAX runs on a GPU, else cpu)")
    p.add_argument("--peak-tflops", type=finite_float, default=None,
                   help="the device's peak TFLOP/s for the MFU figure (default: from a table of GPUs and TPUs)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_train)

    p = bench_subparsers.add_parser(
        "heads", help="exit-head training (frozen backbone) vs the full fine-tune: tokens/s, same model and batch",
        description="Times the train step of train.method=heads (a head per exit, distilled from the last layer, "
                    "the backbone frozen) against GREEN-CODE's full fine-tune (train.method=full) on the same "
                    "model, exits and tokens, interleaved in one process, and the heads step on cached hidden "
                    "states (later epochs); prints tokens/s, their ratios and the multiply-accumulates behind them.")
    p.add_argument("--model", default=None, metavar="DIR", help="a model directory, GGUF file or checkpoint")
    p.add_argument("--shape", default=None, help="or a random model of a built-in shape (see bench forward)")
    p.add_argument("--exit-layers", type=_layers, default=None, help="exit layers (default: the model's own)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (medians; default 3)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_heads)


def main(argv=None) -> int:
    """`python -m greencode_jax.cli.train_cmd ...` is the `greencode` command itself."""
    from greencode_jax.cli.main import main as greencode_main

    return greencode_main(argv)


if __name__ == "__main__":
    sys.exit(main())
