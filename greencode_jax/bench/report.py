"""What every benchmark's lines share: the progress callback, and the word beside a bound.

Kept free of JAX and torch, so the benchmarks of JAX-free code (bench data, bench energy) do not
load them.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]  # receives each line a benchmark prints while it measures


def printer(progress: Progress | None) -> Progress:
    """Where a benchmark sends the lines it prints while it measures: `progress`, or nowhere."""
    return progress if progress is not None else (lambda line: None)


def verdict(ok: bool) -> str:
    """The word beside a figure and its bound."""
    return "meets" if ok else "MISSES"
