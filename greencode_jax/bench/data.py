"""`greencode bench data`: `prepare-data` on the standard library (or a tree of source files),
timed in a fresh process, with its peak memory, at the full size and at half of it.

Each preparation runs in its own interpreter, so its peak RSS is its own and not the parent's;
the half-size run shows how the peak grows with the corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from greencode_jax.bench.report import Progress, printer, verdict
from greencode_jax.data.preprocess import default_workers
from greencode_jax.data.sources import resolve_source
from greencode_jax.errors import GreencodeError

TARGET_SECONDS = 60.0  # the whole Python standard library prepared in <= 60 s on 2 cores

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


def run_bench_data(*, lang: str = "python", source: str | None = None, workers: int = 0, tokenizer: str = "bpe",
                   vocab_size: int = 8192, view: str = "codexglue", max_files: int | None = None, half: bool = True,
                   progress: Progress | None = None) -> dict:
    """Seconds, files/s, model tokens/s and peak RSS of preparing `source` (prepare-data's options),
    then again with half of its files unless `half` is False. The header goes to `progress`."""
    resolved = resolve_source(source, lang)
    if resolved.kind != "files":
        raise GreencodeError("bench data times preprocessing of source files: pass stdlib, jdk, or a directory or "
                             ".zip of source files")
    files = min(len(resolved.refs), max_files or len(resolved.refs))
    workers = workers or default_workers()
    printer(progress)(f"bench data: {lang} from {resolved.description}; {files} files, {workers} workers, tokenizer "
                      f"{tokenizer}, view {view}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    results = {"lang": lang, "source": resolved.description, "workers": workers, "target_seconds": TARGET_SECONDS,
               "target_applies": source in (None, "stdlib") and lang == "python" and files == len(resolved.refs),
               "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    sizes = [("full", files)] + ([("half", files // 2)] if half else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name, count in sizes:
            options = dict(lang=lang, source=source, out=os.path.join(tmp, name), workers=workers,
                           tokenizer=tokenizer, vocab_size=vocab_size, view=view, max_files=count, progress=False)
            results[name] = _probe(options)
    return results


def _probe(options: dict) -> dict:
    """One preparation in a fresh interpreter: its figures, as _PROBE prints them."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(options)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise GreencodeError(f"bench data: preparation failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_bench_data(r: dict) -> str:
    """Each size's rate and peak memory, the stages' seconds beside the target, the memory ratio."""
    mib = 1024**2
    full = r["full"]
    if r["target_applies"]:
        judged = f"target <= {r['target_seconds']:.0f} s: " + verdict(full["seconds"] <= r["target_seconds"])
    else:
        judged = "the 60 s target is for the whole Python standard library"
    lines = []
    for name in ("full", "half"):
        if name in r:
            x = r[name]
            rate, tokens = x["files"] / x["seconds"], x["model_tokens"] / x["seconds"] / 1e3
            peak, worker = x["peak_rss"] / mib, x["worker_peak_rss"] / mib
            lines.append(f"  {name:<5} {x['files']:6d} files  {x['seconds']:7.1f} s  {rate:7.1f} files/s  "
                         f"{tokens:7.0f}k model tokens/s  peak RSS {peak:6.0f} MiB (largest worker {worker:.0f} MiB)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in full["stage_seconds"].items())
    lines.append(f"  total {full['seconds']:.1f} s for {full['files']} files ({judged}); {stages}")
    if "half" in r:
        ratio = full["peak_rss"] / r["half"]["peak_rss"]
        lines.append(f"  peak memory full / half corpus: {ratio:.2f} x ({full['peak_rss'] / mib:.0f} vs "
                     f"{r['half']['peak_rss'] / mib:.0f} MiB)")
    if r["load_average_before"] > 0.5 * (r["cpus"] or 1):
        lines.append(f"  note: load average was {r['load_average_before']:.1f} before the run: other work shared the "
                     "CPUs")
    return "\n".join(lines)
