"""The trace summary behind `bench decode --profile`: hand-built traces in the format JAX's
profiler writes (a GPU's device process with stream lines), and a real CPU trace."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from greencode_jax.bench.trace_summary import command_buffer_events, summarize_trace
from greencode_jax.errors import GreencodeError


def meta(kind, pid, name, tid=None):
    event = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
    return event if tid is None else {**event, "tid": tid}


def op(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def write(path, events):
    with gzip.open(path, "wt") as fh:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, fh)
    return path


def test_device_lines_are_counted_apart_and_host_events_ignored(tmp_path):
    events = [
        meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "python", tid=5),
        meta("process_name", 2, "/device:GPU:0"), meta("thread_name", 2, "Stream #13(Compute)", tid=13),
        meta("thread_name", 2, "XLA Ops", tid=99),
        op(1, 5, "host work", 0.0, 500.0),
        op(2, 13, "gemv", 10.0, 4.0), op(2, 13, "gemv", 20.0, 6.0), op(2, 13, "tanh_fusion", 30.0, 1.5),
        op(2, 99, "dot.1", 10.0, 4.0), op(2, 13, "MemcpyD2H", 32.0, 0.5), op(2, 13, "MemcpyD2H", 40.0, 0.5),
        op(2, 13, "MemcpyD2D", 41.0, 1.0),
    ]
    summary = summarize_trace(write(tmp_path / "t.json.gz", events), top=1)
    assert list(summary) == ["/device:GPU:0 Stream #13(Compute)", "/device:GPU:0 XLA Ops"]
    stream = summary["/device:GPU:0 Stream #13(Compute)"]
    assert (stream["events"], stream["busy_us"], stream["span_us"]) == (6, 13.5, 32.0)  # 10..42
    assert stream["top"] == [{"name": "gemv", "count": 2, "total_us": 10.0}]
    assert stream["copies"] == {"MemcpyD2D": 1, "MemcpyD2H": 2}  # counted however short they are
    assert summary["/device:GPU:0 XLA Ops"]["events"] == 1


def test_a_cpu_trace_has_no_device_lines(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((8, 8))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    (trace,) = tmp_path.rglob("perfetto_trace.json.gz")
    assert summarize_trace(trace) == {}


@pytest.mark.parametrize("content", [b"not gzip", gzip.compress(b"{not json"), gzip.compress(b'{"a": 1}')])
def test_unreadable_trace_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.json.gz"
    path.write_bytes(content)
    with pytest.raises(GreencodeError, match="bad.json.gz"):
        summarize_trace(path)


def test_command_buffer_records_are_counted_from_the_host_lines(tmp_path):
    """XLA's host records of its CUDA graphs, by kind, with or without TraceMeEncode's '#' arguments;
    device kernels of the same name and metadata events are not records."""
    events = [
        meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "python", tid=5),
        meta("process_name", 2, "/device:GPU:0"), meta("thread_name", 2, "Stream #13(Compute)", tid=13),
        op(1, 5, "command_buffer::update#device=0,num_commands=52,num_executions=1#", 0.0, 800.0),
        op(1, 5, "command_buffer::execute#device=0,num_commands=52,num_executions=1#", 800.0, 20.0),
        op(1, 5, "command_buffer::execute", 900.0, 20.0),
        op(1, 5, "command_buffer::updated_elsewhere", 950.0, 1.0),
        op(1, 5, "WARNING: CommandBuffer disabled when profiling", 990.0, 1.0),
        {"ph": "i", "pid": 1, "tid": 5, "name": "command_buffer::update", "ts": 999.0},
        op(2, 13, "gemv", 10.0, 4.0),
    ]
    counts = command_buffer_events(write(tmp_path / "t.json.gz", events))
    assert counts == {"initialize": 0, "update": 1, "execute": 2, "disabled_when_profiling": 1}
