"""The local backend: up to `jobs` stage jobs at once as subprocesses of this machine, each with
JAX's memory preallocation off (several JAX processes share one accelerator) and its own log.

A stage of `hosts` > 1 (parallel.hosts, rollouts.hosts, rl.hosts) runs as that many processes joined
by jax.distributed through a coordinator on 127.0.0.1 and a free port, all writing the job's log; it
takes one slot. It succeeds only if every process does: when one fails, the others are stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from greencode_jax.errors import GreencodeError
from greencode_jax.pipeline.backends.command import STOP_SECONDS, free_port, job_env, process_envs

POLL_SECONDS = 0.2
COORDINATOR_HOST = "127.0.0.1"


class LocalBackend:
    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise GreencodeError(f"--jobs {jobs}: expected at least 1")
        self.slots = jobs
        self._running = {}  # job id -> ([Popen, one per process], log file, start)

    def start(self, job, command: list[str], log_path):
        log = open(log_path, "ab")
        coordinator = f"{COORDINATOR_HOST}:{free_port(COORDINATOR_HOST)}"
        # its own session: a terminal's Ctrl-C reaches the sweep only, which stops each worker once
        processes = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=dict(os.environ, **job_env(), **extra), start_new_session=True)
                     for extra in process_envs(job.plan.hosts, coordinator)]
        self._running[job.id] = (processes, log, time.perf_counter())

    def wait(self) -> list:
        while True:
            finished = [job_id for job_id, (processes, _, _) in self._running.items() if _finished(processes)]
            if finished:
                break
            time.sleep(POLL_SECONDS)
        out = []
        for job_id in finished:
            processes, log, start = self._running.pop(job_id)
            _stop(processes)  # the others of a job one of whose processes failed
            log.close()
            failed = [p.returncode for p in processes if p.returncode != 0]
            out.append((job_id, failed[0] if failed else 0, time.perf_counter() - start))
        return out

    def stop(self):
        """SIGINT to every worker (each stops at its next safe point), then waits; kills what is left."""
        _stop([process for processes, _, _ in self._running.values() for process in processes])
        for _, log, _ in self._running.values():
            log.close()
        self._running.clear()


def _finished(processes: list) -> bool:
    """All of a job's processes have exited, or one has failed (the job has then failed)."""
    codes = [process.poll() for process in processes]
    return all(code is not None for code in codes) or any(code not in (None, 0) for code in codes)


def _stop(processes: list):
    """SIGINT to each process still running, then a bounded wait; kills what is left."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
