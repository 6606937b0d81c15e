"""What every backend does: read at a window's start (`begin`), read again and report (`end`).

A backend meters one device. `begin` returns a mark; `end(mark)` returns a
`DeviceReading`. Neither raises on a vendor error: the error becomes a warning and the
reading becomes "unavailable", so a failing counter never crashes the user's job.
"""

from __future__ import annotations

import time

from greencode_jax.energy.poller import PowerPoller
from greencode_jax.energy.result import UNAVAILABLE, DeviceReading, unavailable


class Backend:
    name = "none"
    method = UNAVAILABLE

    def __init__(self, device: dict, reason: str, versions: dict | None = None, notes=()):
        self.device = device
        self.reason = reason  # why this backend was chosen (and what better ones lacked)
        self.versions = versions or {}
        self.notes = list(notes)  # warnings that hold for every window (e.g. how a GPU was matched)

    @property
    def key(self) -> str:
        return self.device["key"]

    def begin(self):
        raise NotImplementedError

    def end(self, mark) -> DeviceReading:
        raise NotImplementedError

    def close(self):
        pass

    def reading(self, energy_j, duration_s, *, failure: str | None = None, warnings=(), **fields) -> DeviceReading:
        """A reading of this backend's method, or an unavailable one explaining `failure`."""
        reason = self.reason if failure is None else f"{failure} ({self.name})"
        return DeviceReading(device=self.device, backend=self.name, method=self.method, reason=reason,
                             energy_j=None if failure is not None else energy_j, duration_s=duration_s,
                             versions=self.versions, warnings=[*self.notes, *warnings], **fields)


class Unavailable(Backend):
    """A device nothing can meter: every window reports why."""

    def begin(self):
        return time.perf_counter()

    def end(self, mark) -> DeviceReading:
        return unavailable(self.device, self.name, self.reason, time.perf_counter() - mark, versions=self.versions,
                           warnings=list(self.notes))


class Polled(Backend):
    """Power from a shared `PowerPoller` column, integrated over the window.

    `method` is "integrated_power" when the samples are measured watts, "estimated" when
    they are modelled watts (the TPU duty-cycle estimate); `assumptions` then says how.
    """

    def __init__(self, device, reason, poller: PowerPoller, column: int = 0, *, name: str, method: str,
                 versions=None, notes=(), assumptions=None, raw=None, describe=None):
        super().__init__(device, reason, versions, notes)
        self.poller, self.column = poller, column
        self.name, self.method = name, method
        self.assumptions = assumptions or {}
        self.raw = raw or {}
        self._describe = describe  # optional: extra assumptions from the window's mean power

    def begin(self):
        start = self.poller.sample_now()  # before the thread starts, so this sample opens the window
        self.poller.start()
        return start, self.poller.hold(start), time.perf_counter()

    def end(self, mark) -> DeviceReading:
        start, token, host_start = mark
        end = self.poller.sample_now()
        integral = self.poller.integrate(start, end, self.column)
        self.poller.release(token)
        warnings = []
        if integral.errors:
            warnings.append(f"{len(integral.errors)} power read(s) failed during the window; "
                            f"first: {integral.errors[0]}")
        if integral.energy_j is not None and integral.max_gap_s > 5 * self.poller.interval_s:
            warnings.append(f"a {integral.max_gap_s:.3f} s gap between power samples (poll interval "
                            f"{self.poller.interval_s} s): power in the gap is interpolated")
        raw = {**self.raw, "samples": integral.samples, "first_sample_s": integral.start_s,
               "last_sample_s": integral.end_s, "poll_interval_s": self.poller.interval_s}
        assumptions = dict(self.assumptions)
        if integral.energy_j is None:
            host = time.perf_counter() - host_start
            failure = (f"fewer than two power samples in a {host:.4f} s window"
                       + (f"; reads failed: {integral.errors[0]}" if integral.errors else ""))
            warnings.append(failure)
            return self.reading(None, host, failure=failure, raw=raw, warnings=warnings, assumptions=assumptions)
        duration = integral.span_s
        if self._describe is not None and duration > 0:
            assumptions.update(self._describe(integral.energy_j / duration))
        return self.reading(integral.energy_j, duration, raw=raw, warnings=warnings, assumptions=assumptions)

    def close(self):
        self.poller.stop()
