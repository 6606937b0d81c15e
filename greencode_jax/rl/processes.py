"""The processes of a multi-host `collect-rollouts` or `train-policy` (one per host, joined by
`jax.distributed`: parallel/distributed.py) and the output they share.

Every process reads the inputs itself and runs the same checks, so bad input is the same one
error everywhere. The primary (process 0) alone creates, resumes or replaces the work directory
DIR.partial and writes the shared files (the store's metadata, the policy); the others wait at
a barrier until it exists and then write only their own part into it (their chunks, their
shards of an Orbax checkpoint). In a one-process run every function here is what it replaces.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from greencode_jax.atomic import check_resumable, partial_path, read_settings, resumable_directory
from greencode_jax.errors import GreencodeError
from greencode_jax.parallel import initialize_distributed


def joins_processes(function):
    """Decorator: the function first joins the other processes of a multi-process run (the
    GREENCODE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID environment, SLURM, TPU pods; a no-op
    in one process, or once joined). Put it above `holds_output_lock`, which asks JAX which
    process this is."""
    @functools.wraps(function)
    def joined(*args, **kwargs):
        initialize_distributed()
        return function(*args, **kwargs)
    return joined


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str):
    """Every process waits here until all have arrived (nothing in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def total_over_processes(count: int) -> int:
    """The sum of `count` over every process (`count` itself in a one-process run); a barrier too."""
    if jax.process_count() == 1:
        return count
    return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process: the processes of a run decide together (to stop)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def shared_work_directory(out: Path, settings: dict, what: str, *, kind: str, inputs: dict,
                          overwrite: bool) -> tuple[Path, bool]:
    """`atomic.resumable_directory` for every process of the run: (work directory, resumed).

    The primary creates, resumes or (with `overwrite`) replaces it; the others run the same
    read-only checks first, so that a refusal is every process's error, then wait until it exists."""
    if jax.process_count() == 1:
        return resumable_directory(out, settings, what, kind=kind, inputs=inputs, overwrite=overwrite)
    work = partial_path(out)
    resumed = check_resumable(out, settings, what, kind=kind, overwrite=overwrite)  # on every process
    barrier(f"greencode {what}: {work} checked")  # nobody changes it before every process has looked
    if is_primary():
        resumable_directory(out, settings, what, kind=kind, inputs=inputs, overwrite=overwrite)
    barrier(f"greencode {what}: {work} ready")
    if read_settings(work) != json.loads(json.dumps(settings)):
        raise GreencodeError(f"{work}: not prepared by the primary process; the processes of a run must share one "
                             "file system for their outputs")
    return work, resumed
