"""What a remote worker (a Ray task, a SLURM job) runs for a stage job: its command, logged."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

STOP_SECONDS = 120  # a stopped stage saves its checkpoint first; then it is killed


def job_env() -> dict:
    """The variables a job takes from the sweep's process (JAX's, XLA's, the Python path), with JAX's
    memory preallocation off: several jobs may share one accelerator."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "PYTHONPATH"))}
    return dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")


def process_envs(hosts: int, coordinator: str) -> list[dict]:
    """The variables of each process of a stage that runs as `hosts` processes: jax.distributed's
    (parallel/distributed.py) with `coordinator` (host:port of process 0); one process needs none."""
    if hosts == 1:
        return [{}]
    return [{"GREENCODE_COORDINATOR": coordinator, "GREENCODE_NUM_PROCESSES": str(hosts),
             "GREENCODE_PROCESS_ID": str(i)} for i in range(hosts)]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for a multi-host stage's coordinator."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def run_logged_command(command: list[str], cwd: str, log_path: str, env: dict) -> tuple[int, float]:
    """A task's body: `command` in `cwd` with its output appended to `log_path`; a cancel (Ray raises
    KeyboardInterrupt in the task) stops the command at its next safe point first."""
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, **env), start_new_session=True)
        try:
            status = process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    return status, time.perf_counter() - start
