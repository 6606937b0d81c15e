"""Where a sweep's stage jobs run. Each backend launches the job's command and reports its exit
status: `local` (subprocesses on this machine), `ray` (tasks on a Ray cluster), `slurm` (submitit
jobs). Interface: `slots` (jobs at once), `start(job, command, log_path)`, `wait()` -> finished
[(job id, exit status, seconds)] (at least one), `stop()` (an interrupt: every worker stopped)."""

BACKENDS = ("local", "ray", "slurm")

from greencode_jax.errors import GreencodeError


def open_backend(name: str, *, jobs: int = 1, address: str | None = None, cpus: int | None = None,
                 gpus: int | None = None):
    """The backend `name`; ray and slurm import their (optional) libraries only when chosen. `cpus`, `gpus`:
    what each Ray task asks for (ray.py's defaults when None)."""
    if name == "local":
        from greencode_jax.pipeline.backends.local import LocalBackend

        return LocalBackend(jobs)
    if name == "ray":
        from greencode_jax.pipeline.backends.ray import RayBackend

        return RayBackend(address, cpus=cpus, gpus=gpus)
    if name == "slurm":
        from greencode_jax.pipeline.backends.slurm import SlurmBackend

        return SlurmBackend(address)
    raise GreencodeError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")
