"""The processes of a multi-host `collect-rollouts` or `train-policy` (one per host, joined by
`jax.distributed`: parallel/distributed.py) and the output they share.

Every process reads the inputs itself and runs the same checks, so bad input is the same one
error everywhere. The primary (process 0) alone creates, resumes or replaces the work directory
DIR.partial and writes the shared files (the store's metadata, the policy); the others wait at
a barrier until it exists and then write only their own part into it (their chunks, their
shards of an Orbax checkpoint). In a one-process run every function here is what it replaces.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from greencode_jax.atomic import atomic_write_text, can_resume, partial_path, read_settings, resumable_directory
from greencode_jax.errors import GreencodeError
from greencode_jax.interrupts import Interrupted, SafePoints
from greencode_jax.locks import output_lock
from greencode_jax.parallel import initialize_distributed


def holds_run_lock(argument: str):
    """Decorator, `locks.holds_output_lock` for a run of one or several processes: the function first
    joins the other processes (the GREENCODE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID environment,
    SLURM, TPU pods; nothing in one process, or once joined), then the primary takes the lock of the
    output its argument `argument` names, and every process learns whether it could: a lock held by
    another command is every process's error, not the primary's alone while the others wait for it."""
    def wrap(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            initialize_distributed()
            out = signature.bind(*args, **kwargs).arguments[argument]
            with contextlib.ExitStack() as held:
                refused = None
                if is_primary():
                    try:
                        held.enter_context(output_lock(out))
                    except GreencodeError as error:
                        refused = error
                if any_process(refused is not None):
                    raise refused or GreencodeError(f"{out}: the primary process could not lock it (another "
                                                    "greencode command is writing it)")
                return function(*args, **kwargs)
        return locked
    return wrap


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str):
    """Every process waits here until all have arrived (nothing in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def total_over_processes(*counts: int) -> list[int]:
    """Each of `counts` summed over every process (as given in a one-process run); a barrier too."""
    if jax.process_count() == 1:
        return list(counts)
    gathered = multihost_utils.process_allgather(np.asarray(counts, np.int64))  # [processes, counts]
    return [int(v) for v in np.asarray(gathered).reshape(-1, len(counts)).sum(axis=0)]


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process: the processes of a run decide together (to stop)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def run_safe_points() -> SafePoints:
    """`SafePoints` for a block loop whose stops are decided with `check_together`. With several
    processes, a signal arriving after the last check is not raised when the block ends: the others,
    which voted to go on, go on, and so does this one."""
    return SafePoints(raise_pending=jax.process_count() == 1)


def check_together(stop: SafePoints, detail=None):
    """`stop.check(detail)` decided by every process at once: a signal that reached any of them stops
    them all at this point (one stopping alone would leave the others waiting for it in the next
    collective). Only the vote counts: a signal arriving during it waits for the next check. A process
    stopped by another's signal reports SIGTERM, as a preempted one does."""
    if jax.process_count() == 1:
        stop.check(detail)
        return
    if any_process(stop.received is not None):
        if stop.received is None:
            stop.received = "SIGTERM"
        stop.check(detail)


def shared_work_directory(out: Path, settings: dict, what: str, *, kind: str, inputs: dict,
                          overwrite: bool) -> tuple[Path, bool]:
    """`atomic.resumable_directory` for every process of the run: (work directory, resumed).

    The primary creates, resumes or (with `overwrite`) replaces it; the others run the same
    read-only checks first, so that a refusal is every process's error, then wait until it exists."""
    if jax.process_count() == 1:
        return resumable_directory(out, settings, what, kind=kind, inputs=inputs, overwrite=overwrite)
    work = partial_path(out)
    resumed = can_resume(out, settings, what, kind=kind, overwrite=overwrite)  # on every process
    barrier(f"greencode {what}: {work} checked")  # nobody changes it before every process has looked
    if is_primary():
        resumable_directory(out, settings, what, kind=kind, inputs=inputs, overwrite=overwrite)
    barrier(f"greencode {what}: {work} ready")
    if read_settings(work) != json.loads(json.dumps(settings)):
        raise GreencodeError(f"{work}: not prepared by the primary process; the processes of a run must share one "
                             "file system for their outputs")
    return work, resumed


STOPPED = ".stopped-process-"  # + process index: the one line of a process that stopped early


def clear_stop_marks(work: Path):
    """Removes what processes of an interrupted run left with `mark_stopped` (the primary, before a barrier)."""
    for mark in work.glob(STOPPED + "*"):
        mark.unlink(missing_ok=True)


def mark_stopped(work: Path, error: BaseException):
    """Tells the other processes, through the shared work directory, that this one stops, and why."""
    if isinstance(error, Interrupted):  # its detail, what is kept, is for the others to say
        text = f"interrupted by {error.signal_name}"
    else:
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    with contextlib.suppress(OSError):
        atomic_write_text(work / f"{STOPPED}{jax.process_index()}", text + "\n")


def wait_for_the_others(work: Path, finished, kept, poll_s: float = 0.2):
    """Waits until `finished()` (the other processes' files exist), polling the file system instead of
    waiting in a collective: a signal still stops this process at once, and a process that stopped
    early (`mark_stopped`) stops it too, with that process's reason and `kept()`, what is kept. Then a
    barrier, which every process reaches at once: none goes on (the primary, to rename `work`) before
    every other has seen `finished()`."""
    with SafePoints() as stop:
        while not finished():
            stop.check(kept)
            marks = sorted(work.glob(STOPPED + "*"))
            if marks:
                process = marks[0].name[len(STOPPED):]
                reason = marks[0].read_text().strip()
                raise GreencodeError(f"process {process} of the run stopped ({reason}); {kept()}")
            time.sleep(poll_s)
    barrier(f"greencode: {work} finished")
