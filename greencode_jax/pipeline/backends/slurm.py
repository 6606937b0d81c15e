"""The SLURM backend, through submitit: each stage job one SLURM job, its output in the job's log.

On a SLURM cluster the whole stage graph is submitted at once: a job whose upstream jobs are still
queued or running waits for them in SLURM (`--dependency=afterok:ID[:ID...]`, with
`--kill-on-invalid-dep=yes`, so a job whose upstream failed is cancelled rather than left pending),
and the jobs of one stage with the same upstream jobs (the policies of arms that differ only in
`rl`, say) go as one job array. A stage of `hosts` > 1 asks for that many nodes, one task each: every
task runs the stage's command, and parallel/distributed.py joins them through SLURM's variables
(`--kill-on-bad-exit=1`: a task that fails ends the others). A calibration job asks for its node
alone (`--exclusive`): it measures the machine. The jobs need no driver: the sweep's process only
follows them, to write the results at the end (`--detach`: it returns once they are submitted). Each
submitted job's SLURM id goes to `greencode-jobs.json` in submitit's folder, so that a rerun follows
the jobs still queued or running (its new jobs waiting on them) and submits only the others.

Off a SLURM cluster submitit runs the jobs as local processes (its local executor, which the tests
use). It cannot express dependencies, so there each job is submitted only when its upstream jobs
are done, the sweep's process ordering them as for the local backend; nor several hosts.

`folder` (`--address`) is submitit's folder for its scripts and pickles (default sweeps/.submitit). The
SLURM parameters come from the environment: GREENCODE_SLURM_PARTITION, GREENCODE_SLURM_TIME (minutes,
default 240), GREENCODE_SLURM_CPUS (per job, default 4), GREENCODE_SLURM_GPUS (per node, default 0).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from greencode_jax.atomic import atomic_write_text
from greencode_jax.errors import GreencodeError
from greencode_jax.pipeline.backends.command import job_env, run_logged_command
from greencode_jax.pipeline.scheduler import ALONE

POLL_SECONDS = 0.5
DEFAULT_FOLDER = "sweeps/.submitit"
# Dependents of a failed job are cancelled by SLURM (they could never start), not left pending forever.
ON_FAILED_UPSTREAM = {"kill-on-invalid-dep": "yes"}
# In submitit's folder: {stage job: SLURM job id} of what was submitted, so that a rerun follows a job
# still queued or running instead of submitting it again.
RECORD = "greencode-jobs.json"
WAITING = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


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

        self.submitit, self.folder = submitit, Path(folder or DEFAULT_FOLDER) / "%j"
        self.cluster = submitit.AutoExecutor(folder=self.folder, cluster=cluster).cluster  # "slurm" where srun is
        self.executor = self._executor(name="greencode-sweep")
        # On SLURM, a job goes to the queue as soon as its upstream jobs are submitted (scheduler.py).
        self.follows_dependencies = self.cluster == "slurm"
        self.slots = 1 << 16  # SLURM queues what it cannot start
        self._queued = []  # (job, command, log path), submitted by flush()
        self._running = {}  # job id -> (submitit job, start)

    def _executor(self, **extra):
        """An executor with the stage jobs' parameters and `extra`: a new one for each submission, since
        submitit's parameters can be set but never unset."""
        executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        params = slurm_parameters()
        if executor.cluster != "slurm":  # the local executor takes the generic parameters only
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        executor.update_parameters(**dict(params, **extra))
        return executor

    def start(self, job, command: list[str], log_path):
        if job.plan.hosts > 1 and not self.follows_dependencies:
            raise GreencodeError(f"[{job.stage}] {job.plan.hosts} hosts: submitit's local executor runs one process "
                                 "per job; off a SLURM cluster, run the sweep with --backend local")
        if self.follows_dependencies:
            self._queued.append((job, command, os.path.abspath(log_path)))
            return
        submitted = self.executor.submit(run_logged_command, command, os.getcwd(), os.path.abspath(log_path),
                                         job_env())
        self._running[job.id] = (submitted, time.perf_counter())

    def flush(self):
        """Submits the started jobs, stage by stage (each one's upstream jobs have their SLURM ids by
        then): one job array per stage and set of upstream SLURM jobs that are not done."""
        if not self.follows_dependencies:  # the local executor: start() submitted them
            return
        self._queued = [entry for entry in self._queued if not self._follow_queued(entry[0])]
        stages = list(dict.fromkeys(job.stage for job, _, _ in self._queued))
        for stage in stages:
            groups = {}
            for job, command, log_path in self._queued:
                if job.stage == stage:
                    upstream = tuple(self._running[d][0].job_id for d in job.deps if d in self._running)
                    groups.setdefault((upstream, job.plan.hosts), []).append((job, command, log_path))
            for (upstream, hosts), members in groups.items():
                self._submit_array(stage, upstream, hosts, members)
        self._queued = []
        record = self._record()
        record.update({job_id: submitted.job_id for job_id, (submitted, _) in self._running.items()})
        atomic_write_text(self._record_path(), json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _record_path(self) -> Path:
        return self.folder.parent / RECORD

    def _record(self) -> dict:
        try:
            record = json.loads(self._record_path().read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _follow_queued(self, job) -> bool:
        """Whether `job` was submitted by an earlier sweep and is still queued or running in SLURM: then it
        is followed (and its dependents wait on it) rather than submitted again."""
        slurm_id = self._record().get(job.id)
        if not isinstance(slurm_id, str):
            return False
        submitted = self.submitit.SlurmJob(folder=self.folder, job_id=slurm_id, tasks=tuple(range(job.plan.hosts)))
        if submitted.watcher.get_state(slurm_id, mode="force").split()[0] not in WAITING:
            return False
        self._running[job.id] = (submitted, time.perf_counter())
        return True

    def _submit_array(self, stage: str, upstream: tuple, hosts: int, members: list):
        # a multi-host stage: one task per node, which distributed.py's SLURM detection joins
        extra = {"name": f"greencode-{stage}", "nodes": hosts, "tasks_per_node": 1}
        if hosts > 1:  # a task that fails ends the others (srun's default waits for them)
            extra["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if upstream:
            extra.update(slurm_dependency="afterok:" + ":".join(upstream),
                         slurm_additional_parameters=ON_FAILED_UPSTREAM)
        if stage in ALONE:
            extra["slurm_exclusive"] = True
        executor = self._executor(**extra)
        with executor.batch():  # one job alone is submitted as a job, several as an array
            submitted = [executor.submit(run_logged_command, command, os.getcwd(), log_path, job_env())
                         for _, command, log_path in members]
        for (job, _, _), one in zip(members, submitted):
            self._running[job.id] = (one, time.perf_counter())

    def wait(self) -> list:
        while True:
            finished = [job_id for job_id, (submitted, _) in self._running.items() if submitted.done()]
            if finished:
                break
            time.sleep(POLL_SECONDS)
        out = []
        for job_id in finished:
            submitted, start = self._running.pop(job_id)
            try:  # one (status, seconds) per task: a multi-host job fails if any of its tasks does
                failed = [status for status, _ in submitted.results() if status != 0]
                status = failed[0] if failed else 0
            except Exception as error:  # the job died (preempted, timed out, out of memory): its state says why
                status = f"SLURM job {submitted.job_id} {submitted.state}: {str(error).strip().splitlines()[-1:]}"
            out.append((job_id, status, time.perf_counter() - start))
        return out

    def stop(self):
        for submitted, _ in self._running.values():
            submitted.cancel(check=False)
        self._running.clear()
