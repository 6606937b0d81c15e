"""`EnergyMeter`: named windows (nesting and overlapping allowed) over every device's backend.

    meter = EnergyMeter()                      # backends chosen per device (see select.py)
    meter.measure_idle(2.0)                    # optional idle baseline, per device
    with meter.window("generate") as w:
        out = model.generate(ids)
        w.block_on(out)                        # reads wait for the device to finish
    print(w.result.to_json(indent=2))

A sync hook runs before every read, and outputs handed to `end` / `block_on` are
blocked on, so a counter is never read while queued work is still running.
"""

from __future__ import annotations

import contextlib
import time

from greencode_jax.config import EnergyConfig
from greencode_jax.energy.result import WindowResult
from greencode_jax.energy.select import select_backends
from greencode_jax.errors import GreencodeError


class Window:
    """Handle of a `with meter.window(name)` block; `result` is set when the block exits."""

    def __init__(self, name: str):
        self.name = name
        self.outputs = None
        self.result: WindowResult | None = None

    def block_on(self, outputs):
        """JAX values the window's end waits for (`jax.block_until_ready`) before reading."""
        self.outputs = outputs
        return outputs


class EnergyMeter:
    def __init__(self, config: EnergyConfig | None = None, *, sync=None, selections=None, devices=None):
        """`selections` (from `select_backends`) replaces the automatic choice; `sync()` runs before each read."""
        self.config = config or EnergyConfig()
        self.selections = selections if selections is not None else select_backends(devices, self.config)
        self.backends = [s.backend for s in self.selections]
        self.sync = sync
        self.idle_power_w: dict[str, float] = {}
        self._open: dict[str, tuple[float, float, list]] = {}

    def _synchronise(self, outputs):
        if outputs is not None:
            import jax  # lazy: keeps energy free of JAX

            jax.block_until_ready(outputs)
        if self.sync is not None:
            self.sync()

    def begin(self, name: str, outputs=None):
        """Opens window `name` (after blocking on `outputs`, e.g. the previous step's results)."""
        if name in self._open:
            raise GreencodeError(f"energy window {name!r} is already open; end it first or use another name")
        self._synchronise(outputs)
        started_at = time.time()
        start = time.perf_counter()
        marks = [backend.begin() for backend in self.backends]
        self._open[name] = (started_at, start, marks)

    def end(self, name: str, outputs=None) -> WindowResult:
        """Closes window `name` after blocking on `outputs`; returns what every device used."""
        if name not in self._open:
            raise GreencodeError(f"energy window {name!r} is not open (open: {sorted(self._open)})")
        self._synchronise(outputs)
        return self._finish(name)

    def _finish(self, name: str) -> WindowResult:
        started_at, start, marks = self._open.pop(name)
        readings = [backend.end(mark) for backend, mark in zip(self.backends, marks)]
        duration = time.perf_counter() - start
        for reading in readings:
            idle = self.idle_power_w.get(reading.device["key"])
            if idle is not None:
                reading.idle_power_w = idle
                if reading.energy_j is not None:
                    reading.energy_above_idle_j = reading.energy_j - idle * reading.duration_s
        return WindowResult(name, started_at, duration, readings)

    @contextlib.contextmanager
    def window(self, name: str):
        handle = Window(name)
        self.begin(name)
        try:
            yield handle
        except BaseException:
            self._finish(name)  # the block failed: release the window's reads, keep the error
            raise
        handle.result = self.end(name, handle.outputs)

    def measure_idle(self, seconds: float = 2.0) -> WindowResult:
        """Reads every device while this process sleeps; later windows report power above this baseline."""
        if seconds <= 0:
            raise GreencodeError(f"idle measurement of {seconds} s: expected a positive duration")
        self.begin("__idle__")
        time.sleep(seconds)
        result = self.end("__idle__")
        for reading in result.devices:
            if reading.avg_power_w is not None:
                self.idle_power_w[reading.device["key"]] = reading.avg_power_w
        return result

    def close(self):
        for backend in self.backends:
            backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
