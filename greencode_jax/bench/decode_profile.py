"""`greencode bench decode --profile DIR`: one generate of Full(), the skip path and Learned traced
with JAX's profiler, DIR/<row>.perfetto.json.gz, and what each device did per token."""

from __future__ import annotations

import pathlib
import re
import shutil
import tempfile

import jax

from greencode_jax.bench.decode import LEARNED, LEARNED_FUSED, LEARNED_ROWS, SKIP_PATH, DecodeRun
from greencode_jax.bench.trace_summary import command_buffer_events, summarize_trace
from greencode_jax.bench.report import Progress, printer


def profile_decode(run: DecodeRun, out_dir: str, progress: Progress | None = None) -> dict:
    """Traces the rows Full(), the skip path and Learned of a `run_bench_decode` into `out_dir` and
    adds the summaries ("profile"), the device's per-token figures ("device_per_token") and the CUDA
    graphs' host records ("command_buffers") to its results, which it returns."""
    traced = ("Full()", SKIP_PATH, *LEARNED_ROWS)
    results = run.results
    results["profile"], results["device_per_token"], results["command_buffers"] = profile_policies(
        {name: row for name, row in run.runners.items() if name in traced}, results["new_tokens"], out_dir, progress)
    return results


def device_per_token(summary_new: dict, summary_one: dict, new_tokens: int) -> dict:
    """Per token, between trace summaries of a `new_tokens` and a 1-token generate, over their
    stream lines (XLA's op and module lines repeat the kernels): µs of kernels and copies
    ("busy_us") and device-to-host copies ("host_reads": a loop or conditional run from the host
    reads its predicate so)."""
    def total(summary, field):
        return sum(field(line) for name, line in summary.items() if "Stream" in name)

    def per_token(field):
        return (total(summary_new, field) - total(summary_one, field)) / (new_tokens - 1)

    return {"busy_us": per_token(lambda line: line["busy_us"]),
            "host_reads": per_token(lambda line: line["copies"].get("MemcpyD2H", 0))}


def profile_policies(runners: dict, new_tokens: int, out_dir: str,
                     progress: Progress | None = None) -> tuple[dict, dict, dict]:
    """Traces one `new_tokens` generate per runner into out_dir/<name>.perfetto.json.gz and
    sends to `progress`, per device line, its kernels and busy time per token (the prompt pass included).
    A 1-token generate is traced too, so that the device's busy time per token excludes the
    prompt: (busy(new_tokens) - busy(1)) / (new_tokens - 1), as for the wall-clock figures.
    Kernel durations do not swing with the host's timing as wall-clock time does on a GPU,
    but they leave out the device's idle gaps (launches, predicates' trips to the host).
    Kernels inside CUDA graphs (generate's default on a GPU) are not in the trace: there the
    busy time covers only what runs outside them (CUPTI's graph tracing crashed JAX 0.11.2 on an H100).
    It also counts, per traced generate, XLA's host records of its CUDA graphs (trace_summary.
    command_buffer_events): an `update` in every call means the host records a graph again per
    call, because a buffer it uses has a new address each time.
    Returns the summaries, those per-token figures (empty where the trace has no device lines)
    and the command-buffer counts."""
    say = printer(progress)

    def traced(run, n, target=None):
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                run(n)
            (trace,) = pathlib.Path(tmp).rglob("perfetto_trace.json.gz")
            if target is None:
                return summarize_trace(trace)
            shutil.move(trace, target)
            return summarize_trace(target), command_buffer_events(target)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, per_token, graphs = {}, {}, {}
    for name, run in runners.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        target = out / f"{slug}.perfetto.json.gz"
        summary, graphs[name] = traced(run, new_tokens, target)
        summaries[name] = summary
        if summary:
            per_token[name] = device_per_token(summary, traced(run, 1), new_tokens)
        say(f"  profile {name}: {target}; CUDA graphs: " + ", ".join(f"{count} {kind.replace('_', ' ')}"
                                                                      for kind, count in graphs[name].items()))
        for line, s in summary.items():
            say(f"    {line}: {s['events'] / new_tokens:.1f} events/token, busy {s['busy_us'] / new_tokens:.1f} us/token "
                f"of a {s['span_us'] / new_tokens:.1f} us/token span; most time: "
                + ", ".join(f"{t['name'][:40]} x{t['count']} {t['total_us']:.0f} us" for t in s["top"][:3]))
        if not summary:
            say("    no device lines in the trace (on a CPU, XLA's work shows as host threads only)")
    for line in device_per_token_lines(per_token):
        say(line)
    return summaries, per_token, graphs


def device_per_token_lines(rows: dict) -> list[str]:
    """Each traced row's device busy time per token, against Full() (Learned: against the skip path)."""
    if "Full()" not in rows:
        return []
    lines = ["  device busy time per token (kernels and copies of the traced runs, idle gaps left out; kernels "
             "inside CUDA graphs are not traced: XLA_FLAGS=--xla_gpu_enable_command_buffer= turns graphs off), and "
             "device-to-host reads per token:"]
    for name, row in rows.items():
        base = SKIP_PATH if name in (LEARNED, LEARNED_FUSED) and SKIP_PATH in rows else "Full()"
        ratio = "" if name == "Full()" else f" = {row['busy_us'] / rows[base]['busy_us']:.3f}x {base}"
        lines.append(f"    {name:23s} {row['busy_us']:8.1f} us{ratio}; {row['host_reads']:.1f} reads")
    return lines
