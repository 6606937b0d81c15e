"""The local backend: up to `jobs` stage jobs at once as subprocesses of this machine, each with
JAX's memory preallocation off (several JAX processes share one accelerator) and its own log."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from greencode_jax.errors import GreencodeError
from greencode_jax.pipeline.backends.command import STOP_SECONDS, job_env

POLL_SECONDS = 0.2


class LocalBackend:
    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise GreencodeError(f"--jobs {jobs}: expected at least 1")
        self.slots = jobs
        self._running = {}  # job id -> (Popen, log file, start)

    def start(self, job, command: list[str], log_path):
        env = dict(os.environ, **job_env())
        log = open(log_path, "ab")
        # its own session: a terminal's Ctrl-C reaches the sweep only, which stops each worker once
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
        self._running[job.id] = (process, log, time.perf_counter())

    def wait(self) -> list:
        while True:
            finished = [(job_id, entry) for job_id, entry in self._running.items() if entry[0].poll() is not None]
            if finished:
                break
            time.sleep(POLL_SECONDS)
        out = []
        for job_id, (process, log, start) in finished:
            log.close()
            del self._running[job_id]
            out.append((job_id, process.returncode, time.perf_counter() - start))
        return out

    def stop(self):
        """SIGINT to every worker (each stops at its next safe point), then waits; kills what is left."""
        for process, _, _ in self._running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        for process, log, _ in self._running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        self._running.clear()
