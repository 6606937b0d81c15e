"""`greencode prepare-data` and `greencode bench data`.

Wiring (in main.py's build_parser): `data_cmd.register(sub)` and `data_cmd.register_bench(bench_sub)`.
Heavy imports happen inside the handlers, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from greencode_jax.cli.config import finite_float
from greencode_jax.errors import GreencodeError

TARGET_SECONDS = 60.0  # issue 3: the whole Python standard library prepared in <= 60 s on 2 cores


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

_PROBE = r"""
import json, resource, sys, time
from greencode_jax.data import PrepareOptions, prepare_data
options = json.loads(sys.argv[1])
start = time.perf_counter()
summary = prepare_data(PrepareOptions(**options))
seconds = time.perf_counter() - start
# VmHWM: this process's own peak; ru_maxrss of the children: the largest worker's peak.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "files": summary["stats"]["files_found"],
                  "stage_seconds": summary["stats"]["stage_seconds"],
                  "documents": summary["stats"]["documents_total"],
                  "model_tokens": sum(summary["stats"]["model_tokens"].values()),
                  "source": summary["source"], "peak_rss": peak, "worker_peak_rss": workers}))
"""


def _probe(options: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(options)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise GreencodeError(f"bench data: preparation failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        "data", help="time prepare-data on the standard library (target <= 60 s) and its peak memory at two sizes")
    _add_prepare_arguments(p, bench=True)
    p.add_argument("--no-half", action="store_true", help="skip the half-size run (peak memory comparison)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_data)


def cmd_bench_data(args) -> dict:
    from greencode_jax.data.prepare import default_workers
    from greencode_jax.data.sources import resolve_source

    source = resolve_source(args.source, args.lang)
    if source.kind != "files":
        raise GreencodeError("bench data times preprocessing of source files: pass stdlib, jdk, or a directory or "
                             ".zip of source files")
    files = min(len(source.refs), args.max_files or len(source.refs))
    workers = args.workers or default_workers()
    print(f"bench data: {args.lang} from {source.description}; {files} files, {workers} workers, tokenizer "
          f"{args.tokenizer}, view {args.view}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    results = {"lang": args.lang, "source": source.description, "workers": workers, "target_seconds": TARGET_SECONDS,
               "target_applies": (args.source in (None, "stdlib") and args.lang == "python"
                                  and files == len(source.refs)),
               "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    sizes = [("full", files)] + ([] if args.no_half else [("half", files // 2)])
    with tempfile.TemporaryDirectory() as tmp:
        for name, count in sizes:
            options = dict(lang=args.lang, source=args.source, out=os.path.join(tmp, name), workers=workers,
                           tokenizer=args.tokenizer, vocab_size=args.vocab_size, view=args.view, max_files=count,
                           progress=False)
            results[name] = _probe(options)
    _print_bench(results)
    if args.json:
        from greencode_jax.atomic import write_json_output

        write_json_output(args.json, results, "benchmark")
    return results


def _print_bench(r: dict):
    mib = 1024**2
    full = r["full"]
    if r["target_applies"]:
        verdict = f"target <= {r['target_seconds']:.0f} s: " + ("meets" if full["seconds"] <= r["target_seconds"]
                                                              else "MISSES")
    else:
        verdict = "the 60 s target is for the whole Python standard library"
    for name in ("full", "half"):
        if name in r:
            x = r[name]
            rate, tokens = x["files"] / x["seconds"], x["model_tokens"] / x["seconds"] / 1e3
            peak, worker = x["peak_rss"] / mib, x["worker_peak_rss"] / mib
            print(f"  {name:<5} {x['files']:6d} files  {x['seconds']:7.1f} s  {rate:7.1f} files/s  {tokens:7.0f}k "
                  f"model tokens/s  peak RSS {peak:6.0f} MiB (largest worker {worker:.0f} MiB)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in full["stage_seconds"].items())
    print(f"  total {full['seconds']:.1f} s for {full['files']} files ({verdict}); {stages}")
    if "half" in r:
        ratio = full["peak_rss"] / r["half"]["peak_rss"]
        print(f"  peak memory full / half corpus: {ratio:.2f} x ({full['peak_rss'] / mib:.0f} vs "
              f"{r['half']['peak_rss'] / mib:.0f} MiB)")
    if r["load_average_before"] > 0.5 * (r["cpus"] or 1):
        print(f"  note: load average was {r['load_average_before']:.1f} before the run: other work shared the CPUs")
