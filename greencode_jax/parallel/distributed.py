"""Multi-host start-up: `jax.distributed.initialize` when this process is one of several.

Call `initialize_distributed` before anything else touches JAX's devices. How the other
processes are found:
- explicit: `GREENCODE_COORDINATOR` (host:port), `GREENCODE_NUM_PROCESSES` and
  `GREENCODE_PROCESS_ID` in the environment (what `launch/local.sh --processes N` sets), or
  the same three passed as arguments;
- SLURM: a job step with more than one task (`SLURM_JOB_ID`, `SLURM_NTASKS` > 1), one
  process per GPU (`launch/slurm.sh`); JAX reads the node list and task ids itself;
- TPU VM pods: every worker runs the same command (`launch/tpu_pod.sh` sets
  `GREENCODE_DISTRIBUTED=on`; a worker list in `TPU_WORKER_HOSTNAMES` is also detected); JAX
  asks the TPU metadata server for the workers.
Otherwise (one process) nothing is started. `mode="on"` forces JAX's own cluster detection,
`mode="off"` skips all of it.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from greencode_jax.errors import GreencodeError

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    how: str  # "single" | "explicit" | "slurm" | "tpu-pod" | "jax-auto"
    process_index: int
    process_count: int

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0


def _env_int(name: str):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise GreencodeError(f"environment variable {name}={value!r}: expected an integer") from None


def detect(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> tuple[str, dict]:
    """How this process should start: (how, keyword arguments for jax.distributed.initialize)."""
    if mode not in MODES:
        raise GreencodeError(f"parallel.distributed={mode!r}: expected one of {list(MODES)}")
    mode = os.environ.get("GREENCODE_DISTRIBUTED", mode) if mode == "auto" else mode
    if mode not in MODES:
        raise GreencodeError(f"GREENCODE_DISTRIBUTED={mode!r}: expected one of {list(MODES)}")
    if mode == "off":
        return "single", {}
    coordinator = coordinator or os.environ.get("GREENCODE_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _env_int("GREENCODE_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("GREENCODE_PROCESS_ID")
    explicit = [coordinator, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise GreencodeError("multi-process start: GREENCODE_COORDINATOR (host:port), GREENCODE_NUM_PROCESSES and "
                                 "GREENCODE_PROCESS_ID must all be set, or none")
        if not 0 <= process_id < num_processes:
            raise GreencodeError(f"GREENCODE_PROCESS_ID={process_id} outside 0..{num_processes - 1}")
        if num_processes == 1:
            return "single", {}
        return "explicit", dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    if mode == "on":
        return "jax-auto", {}
    if os.environ.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS") or _env_int("SLURM_NPROCS") or 1) > 1:
        return "slurm", {}
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu-pod", {}
    return "single", {}


def initialize_distributed(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> DistributedInfo:
    """Joins the other processes of this run (see the module docstring); a no-op on one host."""
    how, kwargs = detect(mode, coordinator, num_processes, process_id)
    if how != "single" and not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as error:  # the coordinator is unreachable, the cluster is not recognised, ...
            text = str(error).strip().splitlines()
            raise GreencodeError(f"jax.distributed.initialize ({how}) failed: {text[0][:300] if text else error}; "
                                 "check the coordinator address and that every process was started") from None
    return DistributedInfo(how, jax.process_index(), jax.process_count())
