"""The SLURM backend, through submitit: each stage job one SLURM job, submitted when its upstream jobs
are done (the sweep's process follows them, as with Ray), its output in the job's log.

`folder` (`--address`) is submitit's folder for its scripts and pickles (default sweeps/.submitit). The
SLURM parameters come from the environment: GREENCODE_SLURM_PARTITION, GREENCODE_SLURM_TIME (minutes,
default 240), GREENCODE_SLURM_CPUS (per job, default 4), GREENCODE_SLURM_GPUS (per node, default 0).
Off a SLURM cluster submitit runs the jobs as local processes (its local executor), which the tests use.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from greencode_jax.pipeline.backends.command import job_env, run_logged_command

POLL_SECONDS = 0.5
DEFAULT_FOLDER = "sweeps/.submitit"


def slurm_parameters() -> dict:
    """submitit's parameters of every stage job, from GREENCODE_SLURM_* (module docstring)."""
    params = {"timeout_min": int(os.environ.get("GREENCODE_SLURM_TIME", "240")),
              "cpus_per_task": int(os.environ.get("GREENCODE_SLURM_CPUS", "4")), "tasks_per_node": 1, "nodes": 1}
    gpus = int(os.environ.get("GREENCODE_SLURM_GPUS", "0"))
    if gpus:
        params["gpus_per_node"] = gpus
    if os.environ.get("GREENCODE_SLURM_PARTITION"):
        params["slurm_partition"] = os.environ["GREENCODE_SLURM_PARTITION"]
    return params


class SlurmBackend:
    def __init__(self, folder: str | None = None, cluster: str | None = None):
        import submitit  # lazy: an optional dependency (requirements-cluster.txt)

        self.executor = submitit.AutoExecutor(folder=Path(folder or DEFAULT_FOLDER) / "%j", cluster=cluster)
        params = slurm_parameters()
        if self.executor.cluster != "slurm":  # the local executor takes the generic parameters only
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        self.executor.update_parameters(name="greencode-sweep", **params)
        self.slots = 1 << 16  # SLURM queues what it cannot start
        self._running = {}  # job id -> (submitit job, start)

    def start(self, job, command: list[str], log_path):
        submitted = self.executor.submit(run_logged_command, command, os.getcwd(), os.path.abspath(log_path),
                                         job_env())
        self._running[job.id] = (submitted, time.perf_counter())

    def wait(self) -> list:
        while True:
            finished = [job_id for job_id, (submitted, _) in self._running.items() if submitted.done()]
            if finished:
                break
            time.sleep(POLL_SECONDS)
        out = []
        for job_id in finished:
            submitted, start = self._running.pop(job_id)
            try:
                status, _ = submitted.result()
            except Exception as error:  # the job died (preempted, timed out, out of memory): its state says why
                status = f"SLURM job {submitted.job_id} {submitted.state}: {str(error).strip().splitlines()[-1:]}"
            out.append((job_id, status, time.perf_counter() - start))
        return out

    def stop(self):
        for submitted, _ in self._running.values():
            submitted.cancel(check=False)
        self._running.clear()
