"""The Ray backend: each stage job a Ray task on an existing cluster (`--address`, else RAY_ADDRESS;
or the Ray this process already joined), scheduled by the sweep's stage graph.

A task runs the job's command in the sweep's working directory (which, with the stage store, must be
on a filesystem every node sees) and returns its exit status. A task whose worker or node dies is
retried up to `MAX_RETRIES` times (the stage resumes in its store directory); a stage that fails with
an error of its own is not (it would fail the same way).

Resources: each task asks for `cpus` CPUs (`--cpus-per-stage`, default 1) and `gpus` GPUs
(`--gpus-per-stage`; default 1 where the cluster has GPUs, else 0). A stage of `hosts` > 1 runs as
that many tasks, one per bundle of a placement group (STRICT_SPREAD: one host each; PACK on a
one-node cluster, a local `ray.init`), joined by jax.distributed through a coordinator on the first
bundle's node; it succeeds only if every task does, and a failing task cancels the others.
"""

from __future__ import annotations

import os

from greencode_jax.errors import GreencodeError
from greencode_jax.pipeline.backends.command import (STOP_SECONDS, free_port, job_env, process_envs,
                                                     run_logged_command)

MAX_RETRIES = 2
CPUS_PER_JOB = 1
POLL_SECONDS = 1.0
PLACEMENT_SECONDS = 600  # a placement group the cluster cannot place in this time is a job's error


def _coordinator_address() -> str:
    """Runs on the first bundle's node: its address and a port free there, for jax.distributed."""
    import ray

    return f"{ray.util.get_node_ip_address()}:{free_port('0.0.0.0')}"


class RayBackend:
    def __init__(self, address: str | None = None, cpus: int | None = None, gpus: int | None = None):
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
        cluster = ray.cluster_resources()
        self.cpus = CPUS_PER_JOB if cpus is None else cpus
        self.gpus = (1 if cluster.get("GPU", 0) > 0 else 0) if gpus is None else gpus
        if self.cpus < 1 or self.gpus < 0:
            raise GreencodeError(f"--cpus-per-stage {self.cpus}, --gpus-per-stage {self.gpus}: expected at least 1 "
                                 "CPU and no negative GPUs")
        if self.gpus > cluster.get("GPU", 0):
            raise GreencodeError(f"--gpus-per-stage {self.gpus}: the Ray cluster has {cluster.get('GPU', 0):g} GPUs")
        self.slots = max(1, int(cluster.get("CPU", 1) // self.cpus))
        if self.gpus:
            self.slots = min(self.slots, max(1, int(cluster["GPU"] // self.gpus)))
        self.strategy = "PACK" if len([n for n in ray.nodes() if n.get("Alive")]) == 1 else "STRICT_SPREAD"
        self._task = ray.remote(max_retries=MAX_RETRIES)(run_logged_command)
        self._running = {}  # job id -> ([ObjectRef, one per process], placement group or None)

    def start(self, job, command: list[str], log_path):
        args = (command, os.getcwd(), os.path.abspath(log_path), job_env())
        resources = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if job.plan.hosts == 1:
            self._running[job.id] = ([self._task.options(**resources).remote(*args)], None)
            return
        group, placed = self._placement_group(job.plan.hosts)
        coordinator = self.ray.get(self.ray.remote(_coordinator_address).options(
            num_cpus=0, scheduling_strategy=placed(0)).remote())
        refs = [self._task.options(**resources, scheduling_strategy=placed(i)).remote(
                    *args[:3], dict(args[3], **extra))
                for i, extra in enumerate(process_envs(job.plan.hosts, coordinator))]
        self._running[job.id] = (refs, group)

    def _placement_group(self, hosts: int):
        """A placement group of `hosts` bundles of a task's resources, ready; and bundle i's strategy."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        group = placement_group([dict(bundle) for _ in range(hosts)], strategy=self.strategy)
        if not group.wait(timeout_seconds=PLACEMENT_SECONDS):
            self.ray.util.remove_placement_group(group)
            raise GreencodeError(f"--backend ray: the cluster could not place {hosts} x {bundle} ({self.strategy}) in "
                                 f"{PLACEMENT_SECONDS} s")
        return group, lambda index: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)

    def wait(self) -> list:
        while True:
            out = [self._finish(job_id) for job_id, (refs, _) in list(self._running.items()) if self._ended(refs)]
            if out:
                return out
            refs = [ref for refs, _ in self._running.values() for ref in refs]
            _, unfinished = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            self.ray.wait(unfinished, num_returns=1, timeout=POLL_SECONDS)

    def _ended(self, refs: list) -> bool:
        """All of a job's tasks have ended, or one has failed (the job has then failed)."""
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(ready) == len(refs) or any(self._status(ref)[0] != 0 for ref in ready)

    def _status(self, ref) -> tuple:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as error:  # retries exhausted, or the task was lost
            return f"lost on the Ray cluster ({type(error).__name__})", 0.0

    def _finish(self, job_id: str) -> tuple:
        refs, group = self._running.pop(job_id)
        self._cancel(refs)  # the other tasks of a job one of whose tasks failed
        results = [self._status(ref) for ref in refs]
        if group is not None:
            self.ray.util.remove_placement_group(group)
        # a task's own exit status before the others' cancellations it caused
        failed = sorted((status for status, _ in results if status != 0), key=lambda s: isinstance(s, str))
        return job_id, failed[0] if failed else 0, max(seconds for _, seconds in results)

    def _cancel(self, refs: list):
        """Cancels the tasks of `refs` still running (each stops its command at a safe point), then waits."""
        _, unfinished = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in unfinished:
            self.ray.cancel(ref)
        if unfinished:
            self.ray.wait(unfinished, num_returns=len(unfinished), timeout=STOP_SECONDS + 10)

    def stop(self):
        self._cancel([ref for refs, _ in self._running.values() for ref in refs])
        for _, group in self._running.values():
            if group is not None:
                self.ray.util.remove_placement_group(group)
        self._running.clear()
