"""`greencode bench energy`: what a window costs the host, per backend, against the 1 ms bound.

Each backend this machine can use is timed alone (begin + end of an empty window, the
context manager included), then all of them together as `EnergyMeter()` would use them.
"""

from __future__ import annotations

import statistics
import time

from greencode_jax.bench.report import Progress, printer
from greencode_jax.config import EnergyConfig
from greencode_jax.energy.meter import EnergyMeter
from greencode_jax.energy.select import select_backends
from greencode_jax.errors import GreencodeError

TARGET_OVERHEAD_S = 1e-3  # meter overhead per window <= 1 ms on CPU


def _per_window_s(meter, windows: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time per empty window."""
    for i in range(min(windows, 50)):  # warm-up: first reads, poller threads starting
        with meter.window(f"warmup{i}"):
            pass
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(windows):
            with meter.window("bench"):
                pass
        times.append((time.perf_counter() - start) / windows)
    return statistics.median(times)


def run_bench_energy(*, windows: int = 1000, progress: Progress | None = None) -> dict:
    """Seconds per empty window of each backend this machine selects alone (and of the CPU-time
    estimate), then of all of them together; the header and each backend's line go to `progress`
    as it is measured."""
    say = printer(progress)
    if windows <= 0:
        raise GreencodeError(f"--windows {windows}: expected a positive number")
    config = EnergyConfig()
    candidates = _candidates(config)
    say(_header(windows))
    rows = []
    for group in candidates:
        meter = EnergyMeter(config, selections=group)
        try:
            per_window = _per_window_s(meter, windows)
        finally:
            meter.close()
        label = " + ".join(f"{s.spec.key} {s.backend.name} ({s.backend.method})" for s in group)
        rows.append({"backends": label, "per_window_us": per_window * 1e6, "meets": per_window <= TARGET_OVERHEAD_S})
        say(_row_line(rows[-1]))
    return {"windows": windows, "target_us": TARGET_OVERHEAD_S * 1e6, "rows": rows}


def _candidates(config: EnergyConfig) -> list[list]:
    """Every selected backend alone, plus the CPU-time estimate (the fallback everywhere), then all together."""
    selections = select_backends(None, config)
    candidates = [[s] for s in selections]
    if not any(s.backend.name == "cpu_time" for s in selections):
        estimate = EnergyConfig(cpu_backend="estimate")
        candidates += [[s] for s in select_backends(None, estimate) if s.spec.platform == "cpu"]
    if len(selections) > 1:
        candidates.append(selections)
    return candidates


def _header(windows: int) -> str:
    return (f"bench energy: {windows} empty windows x 5 rounds per backend (median); bound "
            f"{TARGET_OVERHEAD_S * 1e6:.0f} µs per window")


def _row_line(row: dict) -> str:
    verdict = "meets" if row["meets"] else "MISSES"
    return (f"  {row['backends']:<60} {row['per_window_us']:9.1f} µs/window  ({verdict} <= "
            f"{TARGET_OVERHEAD_S * 1e6:.0f} µs)")


def format_bench_energy(r: dict) -> str:
    """The lines `run_bench_energy` sends to its progress callback, from its figures."""
    return "\n".join([_header(r["windows"])] + [_row_line(row) for row in r["rows"]])
