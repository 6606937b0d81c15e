"""A 2-process `jax.distributed` run on localhost CPU (Gloo collectives) trains as one process does.

Each process has one CPU device and reads only its half of every global batch; the mesh
spans both processes' devices (data=2)."""

from __future__ import annotations

import socket
import subprocess

from test_train_support import (  # noqa: F401 (fixtures)
    REPO, assert_equivalent_runs, cli_command, compile_cache, equivalence_config, one_device_run, stdlib_corpus,
    subprocess_env, write_config,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_as_one(one_device_run, stdlib_corpus, compile_cache, tmp_path):
    path = write_config(tmp_path / "two.yaml", equivalence_config(stdlib_corpus, tmp_path, "two"))
    port = free_port()
    procs = [subprocess.Popen(cli_command("finetune", path), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(compile_cache, GREENCODE_COORDINATOR=f"localhost:{port}",
                                                 GREENCODE_NUM_PROCESSES="2", GREENCODE_PROCESS_ID=str(i)))
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "on 2 device(s) (data=2, fsdp=1, 2 process(es))" in outputs[0][0]
    assert_equivalent_runs(one_device_run, tmp_path / "two")
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.startswith("final-params")] == []
