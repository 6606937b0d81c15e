"""Power sampled on a background thread and integrated over windows (trapezoid rule).

`read()` returns `(timestamp_s, [watts per column])`: one column per device it covers
(one GPU, or every TPU chip of a host from one tpumonitoring call). A sample whose
timestamp is not newer than the last one is a repeat of a value the driver has not
refreshed yet, and is dropped. A window's bounds are the timestamps of the samples taken
when it begins and ends, so the integral covers exactly the sampled span.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time


@dataclasses.dataclass
class Integral:
    energy_j: float | None  # None with fewer than two samples
    start_s: float
    end_s: float
    samples: int
    max_gap_s: float
    errors: list[str]  # read failures since the window's first sample, oldest first

    @property
    def span_s(self) -> float:
        return self.end_s - self.start_s


class PowerPoller:
    def __init__(self, read, interval_s: float, name: str = "power"):
        self._read = read
        self.interval_s = interval_s
        self.name = name
        self._samples: list[tuple[float, tuple[float, ...]]] = []
        self._errors: list[tuple[float, str]] = []
        self._holds: dict[int, float] = {}  # open windows' start times: samples after the oldest are kept
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"greencode-energy-{self.name}", daemon=True)
            self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample_now()

    def sample_now(self) -> float | None:
        """Reads once; returns the timestamp of the newest sample (None if there is none yet)."""
        try:
            t, values = self._read()
            error = None
        except Exception as exc:  # a vendor error must not kill the thread: it becomes a window warning
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if error is not None:
                self._errors.append((time.time(), error))
            elif not self._samples or t > self._samples[-1][0]:
                self._samples.append((float(t), tuple(float(v) for v in values)))
            return self._samples[-1][0] if self._samples else None

    def hold(self, start_s: float | None) -> int:
        token = next(self._tokens)
        with self._lock:
            self._holds[token] = start_s if start_s is not None else float("-inf")
        return token

    def release(self, token: int):
        with self._lock:
            self._holds.pop(token, None)
            keep_from = min(self._holds.values()) if self._holds else (self._samples[-1][0] if self._samples else 0.0)
            # Keep the newest sample at or before `keep_from`: the next window may start there.
            first = max(0, next((i for i, (t, _) in enumerate(self._samples) if t > keep_from), len(self._samples)) - 1)
            del self._samples[:first]
            self._errors = [(t, e) for t, e in self._errors if t >= keep_from]

    def integrate(self, start_s: float | None, end_s: float | None, column: int = 0) -> Integral:
        with self._lock:
            if start_s is None or end_s is None:
                points = []
            else:
                points = [(t, v[column]) for t, v in self._samples if start_s <= t <= end_s and column < len(v)]
            # Failed reads after the window's first sample count, including the failed end read.
            errors = [e for t, e in self._errors if start_s is None or t >= start_s]
        if len(points) < 2:
            return Integral(None, start_s or 0.0, end_s or 0.0, len(points), 0.0, errors)
        energy = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(points, points[1:]))
        max_gap = max(t1 - t0 for (t0, _), (t1, _) in zip(points, points[1:]))
        return Integral(energy, points[0][0], points[-1][0], len(points), max_gap, errors)
