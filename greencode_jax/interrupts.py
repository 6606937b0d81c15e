"""Ctrl-C and SIGTERM, the same way in every command.

A `greencode` command stopped by SIGINT exits with status 130, by SIGTERM with 143, after one
stderr line: `greencode: interrupted by SIGTERM; <what was kept, and how to resume>`.

Two modes:

- Outside long loops (`install`, done by the CLI's `main`): a signal raises KeyboardInterrupt at
  once, and which signal it was is remembered (`received`), so the status is right even when a
  library turns the KeyboardInterrupt into another exception on its way out.
- Inside a long loop (`SafePoints`): a signal only sets a flag; the loop calls `check(detail)` at
  its safe points (between batches, after a checkpoint is saved), which raises `Interrupted`.
  Nothing is cut half-way: not a JAX compile or dispatch (a KeyboardInterrupt inside XLA's
  compile leaves its thread pools with work that crashes the interpreter's teardown), not a
  checkpoint save. A second Ctrl-C interrupts at once, except inside `critical()`.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import time

EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: str | None = None  # the first signal this process received since `reset`
_last = None  # the latest signal raised as a KeyboardInterrupt, delivered again if Python drops it


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal. `detail`: one line saying what was kept and where the same
    command resumes. `at_safe_point`: raised by `SafePoints.check`, with nothing in flight."""

    def __init__(self, signal_name: str = "SIGINT", detail: str = "", *, at_safe_point: bool = False):
        super().__init__(signal_name, detail)
        self.signal_name, self.detail, self.at_safe_point = signal_name, detail, at_safe_point

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signal_name, EXIT_STATUS["SIGTERM"])  # another process's signal: preempted

    def prefixed(self, prefix: str) -> "Interrupted":
        return Interrupted(self.signal_name, f"{prefix} {self.detail}".strip(), at_safe_point=self.at_safe_point)

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}" + (f"; {self.detail}" if self.detail else "")


def received() -> str | None:
    """"SIGINT" / "SIGTERM": the first signal received since `reset`, or None."""
    return _received


def reset():
    global _received, _last
    _received = _last = None


def _note(signum) -> str:
    global _received
    name = signal.Signals(signum).name
    if _received is None:
        _received = name
    return name


def interrupted(detail: str = "") -> Interrupted:
    """An `Interrupted` for a plain KeyboardInterrupt (or what a library made of it)."""
    return Interrupted(_received or "SIGINT", detail)


def _raise(signum):
    global _last
    _last = signum
    raise KeyboardInterrupt


def _immediate(signum, frame):
    _note(signum)
    _raise(signum)


def _unraisable(hook_args, previous=sys.unraisablehook):
    """A KeyboardInterrupt raised inside a `__del__` or a garbage-collector callback (JAX has one)
    is printed ("Exception ignored in ...") and dropped, and the command would go on: deliver the
    signal again, from another thread, so that it lands once the callback has returned."""
    if isinstance(hook_args.exc_value, KeyboardInterrupt) and _last is not None:
        threading.Thread(target=_deliver_again, args=(_last,), name="greencode-interrupt", daemon=True).start()
        return
    previous(hook_args)


def _deliver_again(signum):
    time.sleep(0.01)
    signal.pthread_kill(threading.main_thread().ident, signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> dict:
    """SIGINT and SIGTERM raise KeyboardInterrupt at once, remembering which arrived; returns what
    it replaced, for `restore`."""
    if not _in_main_thread():
        return {}
    previous = {sig: signal.signal(sig, _immediate) for sig in SIGNALS}
    hook = functools.partial(_unraisable, previous=sys.unraisablehook)
    previous["unraisablehook"] = (sys.unraisablehook, hook)
    sys.unraisablehook = hook
    return previous


def restore(previous: dict):
    for sig, handler in previous.items():
        if sig == "unraisablehook":
            before, ours = handler
            if sys.unraisablehook is ours:  # not if another hook was installed over ours since
                sys.unraisablehook = before
        else:
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def ignore():
    """Signals arriving from now on are ignored (a process that is already ending)."""
    if _in_main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class SafePoints:
    """Within the block, SIGINT and SIGTERM only set `received`; `check(detail)` raises `Interrupted`
    once one has. A second Ctrl-C raises KeyboardInterrupt at once, unless inside `critical()`.

    `detail` is the one line of the `Interrupted` (a string, or a function called when raised);
    the last one given is kept. With `raise_pending`, a signal that arrives after the last check
    is raised when the block ends normally; without it, the caller reads `received` itself."""

    def __init__(self, *, raise_pending: bool = True):
        self.received: str | None = None
        self._raise_pending = raise_pending
        self._detail = None
        self._critical = 0
        self._previous: dict = {}

    def _handler(self, signum, frame):
        name = _note(signum)
        if self.received is not None and signum == signal.SIGINT and not self._critical:
            _raise(signum)  # the second Ctrl-C: at once
        if self.received is None:
            self.received = name

    def check(self, detail=None):
        if detail is not None:
            self._detail = detail
        if self.received is not None:
            raise Interrupted(self.received, self._describe(), at_safe_point=True)

    def _describe(self) -> str:
        return self._detail() if callable(self._detail) else (self._detail or "")

    @contextlib.contextmanager
    def critical(self):
        """A block no signal cuts (a checkpoint save): even a second Ctrl-C waits for its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1

    def __enter__(self):
        if _in_main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in SIGNALS}
        return self

    def __exit__(self, exc_type, exc, tb):
        restore(self._previous)
        self._previous = {}
        if exc_type is None and self._raise_pending and self.received is not None:
            raise Interrupted(self.received, self._describe(), at_safe_point=True)
        return False
