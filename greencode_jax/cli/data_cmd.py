"""`greencode prepare-data` and `greencode bench data`.

Wiring (in main.py's build_parser): `data_cmd.register(sub)` and `data_cmd.register_bench(bench_sub)`.
Heavy imports happen inside the handlers, so `--help` answers at once.
"""

from __future__ import annotations

import argparse

from greencode_jax.cli.bench_cmd import echo, write_figures
from greencode_jax.cli.config import finite_float
from greencode_jax.errors import GreencodeError


def _ratios(text: str):
    from greencode_jax.data.split import parse_ratios

    try:
        return parse_ratios(text)
    except GreencodeError as error:
        raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1])


def _add_prepare_arguments(p: argparse.ArgumentParser, bench: bool = False):
    p.add_argument("--lang", default="python", choices=["python", "java"], help="language (default python)")
    p.add_argument("--source", default=None, metavar="SRC",
                   help="stdlib (default for python: this Python's standard library), jdk or jdk:MODULE,... "
                        "(default for java: an installed JDK's src.zip), a directory or .zip of .py/.java files, "
                        "a CodeXGLUE directory (train.txt/dev.txt/test.txt), a line-level test.json, a directory "
                        "saved by Hugging Face datasets, a TFDS dataset directory, hf:OWNER/NAME[:CONFIG] or "
                        "google/code_x_glue_cc_code_completion_token|_line (network), tfds:NAME (network unless "
                        "prepared in --tfds-data-dir)")
    p.add_argument("--workers", type=int, default=0, help="preprocessing processes (default: one per core, max 8)")
    p.add_argument("--tokenizer", default="bpe", metavar="bpe|none|MODEL_DIR",
                   help="bpe: train a byte-level BPE on the train split (default); a Hugging Face model directory: "
                        "use that model's tokenizer; none: no tokenizer or token files")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--view", default="codexglue", choices=["codexglue", "raw"],
                   help="what the model is shown: codexglue = the space-joined CodeXGLUE tokens, as GREEN-CODE "
                        "(default); raw = the source text")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (in path order)")
    if bench:
        return
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--literals", default=None, metavar="FILE",
                   help="CodeXGLUE literals.json whitelist (default: the 200 strings, 30 numbers and 30 chars most "
                        "frequent in the train split)")
    p.add_argument("--split", type=_ratios, default=(0.8, 0.1, 0.1), metavar="TRAIN,DEV,TEST",
                   help="split ratios by a hash of each file's path (default 0.8,0.1,0.1); splits a CodeXGLUE or "
                        "Hugging Face source already has are kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the line-level sample cuts (default 0)")
    p.add_argument("--line-samples", type=int, default=1000,
                   help="CodeXGLUE line-level samples cut from the test split (default 1000; 0: none)")
    p.add_argument("--bpe-sample-mb", type=finite_float, default=8.0,
                   help="train the BPE on at most this many MB of train text, chosen by path hash (default 8; "
                        "bounds the training's memory)")
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir for tfds:NAME sources")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers):
    p = subparsers.add_parser(
        "prepare-data", help="code corpus -> CodeXGLUE-format TFDS corpus, tokenizer and packed token files",
        description="Prepares a code corpus: CodeXGLUE token-level preprocessing, deterministic train/dev/test "
                    "split by path hash, duplicates removed, a TFDS ArrayRecord corpus with stats, a tokenizer, "
                    "memory-mappable token files and line-level samples. Without --source it uses real code "
                    "already on this machine: Python's standard library, or a JDK's sources.")
    _add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args):
    from greencode_jax.data import PrepareOptions, prepare_data

    options = PrepareOptions(
        lang=args.lang, out=args.out, source=args.source, literals=args.literals, split=tuple(args.split),
        seed=args.seed, workers=args.workers, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        view=args.view, line_samples=args.line_samples, max_files=args.max_files, bpe_sample_mb=args.bpe_sample_mb,
        tfds_data_dir=args.tfds_data_dir, overwrite=args.overwrite, progress=not args.quiet)
    print_summary(prepare_data(options))


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def print_summary(summary: dict):
    stats = summary["stats"]
    print(f"prepared {summary['lang']} from {summary['source']}")
    if stats["documents"]:
        docs = " | ".join(f"{s} {stats['documents'].get(s, 0)}" for s in ("train", "dev", "test"))
        failures = stats["failures"]
        reasons = ", ".join(f"{n} {r}" for r, n in failures["by_reason"].items())
        print(f"  files       {stats['files_found']} found -> {docs}  (duplicates {stats['duplicates_removed']}, "
              f"empty {stats['empty_removed']}, failed {failures['count']}{': ' + reasons if reasons else ''})")
        line = f"  tokens      CodeXGLUE {_millions(sum(stats['codexglue_tokens'].values()))}"
        if summary["tokenizer"]:
            line += (f" | model {_millions(sum(stats['model_tokens'].values()))} "
                     f"({summary['tokenizer']['name']}, view {summary['view']})")
        print(line)
        lits = stats["literals"]
        print("  literals    " + ", ".join(f"{k} {v.get('kept', 0)} kept / {v.get('normalised', 0)} normalised"
                                          for k, v in lits.items() if v) + f"  (whitelist: {summary['literals']})")
        for failure in failures["first"][:5]:
            print(f"  failed      {failure['path']}: {failure['reason']}: {failure['detail']}")
        if failures["count"] > 5:
            print(f"  ...         {failures['count'] - 5} more failures listed in stats.json")
    if stats["line_samples"]:
        print(f"  line-level  {stats['line_samples']} samples")
    seconds = stats["seconds"]
    rate = stats["files_found"] / seconds if seconds and stats["files_found"] else 0.0
    print(f"wrote {summary['out']} in {seconds:.1f} s" + (f" ({rate:.0f} files/s)" if rate else ""))


# ---------------------------------------------------------------------------------------------- bench


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        "data", help="time prepare-data on the standard library (target <= 60 s) and its peak memory at two sizes")
    _add_prepare_arguments(p, bench=True)
    p.add_argument("--no-half", action="store_true", help="skip the half-size run (peak memory comparison)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_data)


def cmd_bench_data(args) -> dict:
    from greencode_jax.bench.data import format_bench_data, run_bench_data

    results = run_bench_data(lang=args.lang, source=args.source, workers=args.workers, tokenizer=args.tokenizer,
                             vocab_size=args.vocab_size, view=args.view, max_files=args.max_files,
                             half=not args.no_half, progress=echo)
    print(format_bench_data(results))
    write_figures(args.json, results)
    return results
