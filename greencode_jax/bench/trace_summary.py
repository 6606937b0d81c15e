"""What a profiled run spent on its devices: kernels, busy time and span, from a JAX trace.

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes `perfetto_trace.json.gz` in
Chrome's trace-event format: processes named `/device:GPU:0` hold lines (threads: one per
stream, plus XLA's op and module lines) of complete ("X") events, each kernel or memory copy
with its start `ts` and `dur` in µs. On a CPU there is no device process, only host
threads, and the summary is empty.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

from greencode_jax.errors import GreencodeError


def load_trace_events(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
            trace = json.load(fh)
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise GreencodeError(f"trace {path}: cannot read it as (gzipped) trace-event JSON ({e})") from e
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list):
        raise GreencodeError(f"trace {path}: no traceEvents list")
    return events


def summarize_trace(path: str | Path, top: int = 8) -> dict:
    """Per device line (a stream, or XLA's op and module lines, which cover the same kernels
    again): its complete events, their summed duration ("busy"), the time from the first
    start to the last end ("span"), the `top` names by total time, and the count of each kind
    of memory copy ("copies", e.g. MemcpyD2H)."""
    events = load_trace_events(path)
    devices = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"
               and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    lines = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in devices}
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices:
            ops[e["pid"], e.get("tid")].append(e)
    summary = {}
    for (pid, tid), line_ops in ops.items():
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for e in line_ops:
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += e.get("dur", 0.0)
        summary[f"{devices[pid]} {lines.get((pid, tid), tid)}"] = {
            "events": len(line_ops),
            "busy_us": sum(total for _, total in by_name.values()),
            "span_us": max(e["ts"] + e.get("dur", 0.0) for e in line_ops) - min(e["ts"] for e in line_ops),
            "top": [{"name": name, "count": count, "total_us": total}
                    for name, (count, total) in sorted(by_name.items(), key=lambda item: -item[1][1])[:top]],
            # memory copies by direction, however short: a device-to-host copy in a decode step
            # is a loop's or conditional's predicate on its way to the host
            "copies": {name: count for name, (count, _) in sorted(by_name.items()) if name.startswith("Memcpy")},
        }
    return dict(sorted(summary.items()))


# XLA:GPU's host-side records of its command buffers (CUDA graphs): built, re-recorded because
# an allocation they use moved, launched; and the profiler's fallback to plain kernels
COMMAND_BUFFER_EVENTS = {
    "command_buffer::initialize": "initialize",
    "command_buffer::update": "update",
    "command_buffer::execute": "execute",
    "WARNING: CommandBuffer disabled when profiling": "disabled_when_profiling",
}


def command_buffer_events(path: str | Path) -> dict:
    """How often the traced run built, re-recorded (`update`: some buffer a graph uses had a new
    address, so the host records again every command of it that uses one) and launched XLA's
    CUDA graphs, and how often the profiler made XLA run their kernels one by one instead.
    Names carry their arguments after a '#' (tsl's TraceMeEncode); every kind is counted,
    zeros included."""
    counts = dict.fromkeys(COMMAND_BUFFER_EVENTS.values(), 0)
    for e in load_trace_events(path):
        kind = COMMAND_BUFFER_EVENTS.get(str(e.get("name", "")).split("#")[0]) if e.get("ph") == "X" else None
        if kind:
            counts[kind] += 1
    return counts
