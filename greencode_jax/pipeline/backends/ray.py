"""The Ray backend: each stage job a Ray task on an existing cluster (`--address`, else RAY_ADDRESS;
or the Ray this process already joined), scheduled by the sweep's stage graph.

A task runs the job's command in the sweep's working directory (which, with the stage store, must be
on a filesystem every node sees) and returns its exit status. A task whose worker or node dies is
retried up to `MAX_RETRIES` times (the stage resumes in its store directory); a stage that fails with
an error of its own is not (it would fail the same way). Each task asks for `CPUS_PER_JOB` CPUs.
"""

from __future__ import annotations

import os

from greencode_jax.errors import GreencodeError
from greencode_jax.pipeline.backends.command import STOP_SECONDS, job_env, run_logged_command

MAX_RETRIES = 2
CPUS_PER_JOB = 1


class RayBackend:
    def __init__(self, address: str | None = None):
        import ray  # lazy: an optional dependency (requirements-cluster.txt)

        self.ray = ray
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if not address:
                raise GreencodeError("--backend ray: give the cluster's address (--address HOST:PORT, or set "
                                     "RAY_ADDRESS); `ray start --head` starts one")
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise GreencodeError(f"--backend ray: cannot join the Ray cluster at {address} ({error})") from None
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1) // CPUS_PER_JOB))
        self._task = ray.remote(num_cpus=CPUS_PER_JOB, max_retries=MAX_RETRIES)(run_logged_command)
        self._running = {}  # ObjectRef -> job id

    def start(self, job, command: list[str], log_path):
        ref = self._task.remote(command, os.getcwd(), os.path.abspath(log_path), job_env())
        self._running[ref] = job.id

    def wait(self) -> list:
        done, _ = self.ray.wait(list(self._running), num_returns=1)
        out = []
        for ref in done:
            job_id = self._running.pop(ref)
            try:
                status, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayError as error:  # retries exhausted, or the task was lost
                status, seconds = f"lost on the Ray cluster ({type(error).__name__})", 0.0
            out.append((job_id, status, seconds))
        return out

    def stop(self):
        for ref in self._running:
            self.ray.cancel(ref)
        if self._running:
            self.ray.wait(list(self._running), num_returns=len(self._running), timeout=STOP_SECONDS + 10)
        self._running.clear()
