"""The stage store: running one stage into its hashed directory, once.

Each stage directory holds the stage's outputs, an ownership manifest and `status.json`: `running`
(with the PID and host of the worker that holds its lease), `done` (with its seconds), `failed`
(with its one-line error) or `stopped` (interrupted; the next run resumes it in place). The lease
is the directory's output lock (`locks.output_lock`, an flock on `.<stage>-<key>.lock` beside it):
two workers never run the same stage at once, and the kernel drops it when its holder dies. A
stage that fails before writing anything leaves no directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from greencode_jax import interrupts, ownership
from greencode_jax.atomic import atomic_write_text
from greencode_jax.errors import GreencodeError
from greencode_jax.locks import output_lock
from greencode_jax.pipeline.plan import StagePlan

STATUS = "status.json"
KIND = "stage"


def read_status(directory: Path) -> dict:
    """The status record of a stage directory ({} when it has none or an unreadable one)."""
    try:
        status = json.loads((Path(directory) / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def is_done(stage: StagePlan) -> bool:
    return read_status(stage.dir).get("status") == "done" and all(p.exists() for p in stage.links.values())


def _write_status(stage: StagePlan, status: str, **extra):
    record = {"status": status, "stage": stage.name, "key": stage.key, "pid": os.getpid(),
              "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    atomic_write_text(stage.dir / STATUS, json.dumps(record, indent=2) + "\n")


def run_stage(stage: StagePlan, build, what: str, log) -> float:
    """Runs `build` (which writes the stage's outputs into `stage.dir`) unless the stage is done; returns
    its seconds (0.0 when it was done). Errors come back prefixed with `[stage]`, one line."""
    if is_done(stage):
        log(f"[{stage.name}] up to date ({what}), skipped")
        return 0.0
    if secondary_process():
        return _run_secondary(stage, build)
    with output_lock(stage.dir):  # the lease: a second worker on this stage gets one line naming the holder
        if is_done(stage):  # another worker finished it between the check and the lease
            log(f"[{stage.name}] up to date ({what}), skipped")
            return 0.0
        stage.dir.mkdir(exist_ok=True)
        if ownership.read_manifest(stage.dir) is None:
            ownership.write_manifest(stage.dir, KIND, {})
        _write_status(stage, "running")
        log(f"[{stage.name}] {what}")
        start = time.perf_counter()
        try:
            with ownership.stage(stage.name):
                build()
        except BaseException as error:
            _record_failure(stage, error)
            raise _one_line(stage.name, error) from None
        seconds = time.perf_counter() - start
        _write_status(stage, "done", seconds=round(seconds, 1))
    log(f"[{stage.name}] done in {seconds:.1f} s")
    return seconds


def secondary_process() -> bool:
    """Whether this process is one of a multi-host stage's processes other than the first, as its backend
    started it (GREENCODE_PROCESS_ID, or SLURM's task id); read without JAX, which joins them later."""
    for name in ("GREENCODE_PROCESS_ID", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.strip():
            return value.strip() != "0"
    return False


def _run_secondary(stage: StagePlan, build) -> float:
    """A secondary process's part of a multi-host stage: its share of `build` (which joins the others; the
    libraries write the shared outputs from the primary). The primary holds the lease and the status."""
    start = time.perf_counter()
    try:
        with ownership.stage(stage.name):
            build()
    except BaseException as error:
        raise _one_line(stage.name, error) from None
    return time.perf_counter() - start


def _stopped(error: BaseException) -> bool:
    return isinstance(error, (interrupts.Interrupted, KeyboardInterrupt)) or (
        isinstance(error, Exception) and interrupts.received() is not None)


def _one_line(name: str, error: BaseException) -> BaseException:
    if isinstance(error, interrupts.Interrupted):  # what the stage kept; the same command resumes it
        return error.prefixed(f"[{name}]")
    if _stopped(error):
        return interrupts.interrupted(f"[{name}] stopped; the same command continues from this stage")
    if isinstance(error, GreencodeError):
        return GreencodeError(f"[{name}] {error}")
    return error


def _record_failure(stage: StagePlan, error: BaseException):
    """`stopped` or `failed` (with the error's first line) in the status; a stage that wrote nothing of
    its own leaves no directory behind."""
    own = set(os.listdir(stage.dir)) - {STATUS, ownership.MANIFEST}
    if not own and not _stopped(error):
        shutil.rmtree(stage.dir, ignore_errors=True)  # (the lease removes the store too, when it made it)
        return
    if _stopped(error):
        _write_status(stage, "stopped")
    else:
        message = str(error).strip().splitlines()
        _write_status(stage, "failed", error=(message[0] if message else type(error).__name__))


def _into_store(link: Path, stage: StagePlan) -> bool:
    """Whether `link` points into the stage store (a link a run made, to this or an older key)."""
    target = Path(os.path.abspath(link.parent / os.readlink(link)))
    return target.is_relative_to(os.path.abspath(stage.dir.parent))


def link_outputs(run_dir: Path, stage: StagePlan, check_only: bool = False):
    """Makes each of the stage's names in `run_dir` a relative link to its output in the store. What
    stands in the way is replaced only when it is a link or this stage's own output (a run made before
    the store); anything else is named. `check_only`: the checks, nothing changed."""
    for name, target in stage.links.items():
        path = run_dir / name
        relative = os.path.relpath(target, run_dir)
        if path.is_symlink():
            if os.readlink(path) == relative:
                continue
            if not _into_store(path, stage):  # a user's own link: theirs, not replaced
                raise GreencodeError(f"[{stage.name}] {path}: a link to {os.readlink(path)}, which is not in the "
                                     f"stage store {stage.dir.parent}; it is left as it is: move it away")
            if check_only:
                continue
        elif path.exists():
            try:
                ownership.check_stage_output(path, stage.name)
            except GreencodeError as error:
                raise GreencodeError(f"[{stage.name}] {error}") from None
            if check_only:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if check_only or not target.exists():
            continue
        temporary = path.with_name(f".{name}.link-{os.getpid()}")
        os.symlink(relative, temporary)
        os.replace(temporary, path)
