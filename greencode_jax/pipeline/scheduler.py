"""The sweep's scheduler: launches each stage job once its upstream jobs are done, as many at once
as the backend has slots (or, on a backend that follows dependencies itself, SLURM, once its upstream
jobs are launched: the whole graph at once), and follows failures downstream.

A job whose stage directory is done is never launched. A job that fails (a non-zero status, or a
zero status without a done stage directory) is recorded with its one-line error (the last
`greencode:` line of its log); every job downstream of it is not launched and carries the same
error, while the other arms go on. An interrupt (Ctrl-C, SIGTERM) stops the backend's workers, each
at its own clean point, before it goes on up.
"""

from __future__ import annotations

from pathlib import Path

ERROR_PREFIXES = ("greencode: error: ", "greencode: ")
# Stages that measure the machine: each runs alone, so that no other job's load enters its energy fit.
ALONE = ("calibrate",)


def error_line(log_path: Path, status) -> str:
    """A failed job's one-line error: the last `greencode:` line of its log, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        for prefix in ERROR_PREFIXES:
            if line.startswith(prefix):
                return line[len(prefix):]
    last = lines[-1] if lines else ""
    return f"exit status {status}" + (f": {last[:300]}" if last else "") + f" (log: {log_path})"


def run_jobs(jobs: dict, backend, out: Path, command_of, log, detach: bool = False) -> dict:
    """Runs every job of `jobs` (id -> sweep.Job, in dependency order) that is not done, `command_of(job)`
    on `backend`; returns {job id: one-line error} of the jobs that failed or could not run. `detach` (a
    backend that follows dependencies): returns once every job is submitted, and they go on without us."""
    errors, running = {}, {}
    pending = [job for job in jobs.values() if not job.done]
    if len(pending) < len(jobs):
        log(f"{len(jobs) - len(pending)} of {len(jobs)} stage jobs are done in the store already")
    (out / "logs").mkdir(exist_ok=True)
    try:
        while pending or running:
            _fail_downstream(pending, errors, log)
            launch_ready(pending, running, jobs, backend,
                         lambda job: (command_of(job), out / "logs" / f"{job.id}.log"), log)
            if detach:
                return errors
            if not running:
                for job in pending:  # upstream neither done nor failed: cannot happen, but never loop forever
                    errors[job.id] = f"[{job.stage}] its upstream jobs did not finish"
                break
            order = list(jobs)
            for job_id, status, seconds in sorted(backend.wait(), key=lambda finished: order.index(finished[0])):
                job = running.pop(job_id)
                if status == 0 and job.done:
                    log(f"[{job.stage}] {job.id} done in {seconds:.1f} s")
                    continue
                failed_upstream = [d for d in job.deps if d in errors]  # SLURM cancelled it: its upstream's error
                errors[job_id] = (errors[failed_upstream[0]] if failed_upstream
                                  else error_line(out / "logs" / f"{job.id}.log", status))
                log(f"[{job.stage}] {job.id} FAILED: {errors[job_id]}")
    except BaseException:
        backend.stop()
        raise
    return errors


def launch_ready(pending: list, running: dict, jobs: dict, backend, command_and_log_of, log):
    """Starts on `backend` (moving them from `pending` to `running`) the jobs that can start now. A
    backend that `follows_dependencies` (SLURM) takes every job whose upstream jobs are done or started,
    so the whole graph goes at once, its queue ordering them; its `flush()` then submits them."""
    follows = getattr(backend, "follows_dependencies", False)
    while True:
        startable = _startable(pending, running, jobs, backend.slots, follows)
        for job in startable:
            pending.remove(job)
            running[job.id] = job
            log(f"[{job.stage}] {job.id} started ({_runs(job)})")
            backend.start(job, *command_and_log_of(job))
        if not (follows and startable):
            break
    if hasattr(backend, "flush"):
        backend.flush()


def _startable(pending: list, running: dict, jobs: dict, slots: int, follows_dependencies: bool = False) -> list:
    """The ready jobs to start now: as many as the free slots, a calibration only on an idle backend;
    on a backend that follows dependencies, every job whose upstream jobs are done or started."""
    if follows_dependencies:
        return [job for job in pending if all(jobs[d].done or d in running for d in job.deps)]
    if any(job.stage in ALONE for job in running.values()):
        return []
    ready = [job for job in pending if all(jobs[d].done for d in job.deps)]
    alone = [job for job in ready if job.stage in ALONE]
    if alone:
        return alone[:1] if not running else []
    return ready[:max(0, slots - len(running))]


def _fail_downstream(pending: list, errors: dict, log):
    changed = True
    while changed:
        changed = False
        for job in list(pending):
            failed = [d for d in job.deps if d in errors]
            if failed:
                pending.remove(job)
                errors[job.id] = errors[failed[0]]
                log(f"[{job.stage}] {job.id} not run: {failed[0]} failed")
                changed = True


def _runs(job) -> str:
    return f"{len(job.runs)} runs" if len(job.runs) > 3 else ", ".join(job.runs)
