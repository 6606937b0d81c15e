"""What a Ray task of `greencode sweep` asks for, on a local Ray cluster the test starts (127.0.0.1, 2
CPUs and one declared GPU) and stops: by default one CPU and, where the cluster has GPUs, one GPU (Ray
then gives the task that GPU in CUDA_VISIBLE_DEVICES); a task asking for more than there is, one error."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from greencode_jax.errors import GreencodeError

PROBE = [sys.executable, "-c", "import os; print('visible:', os.environ.get('CUDA_VISIBLE_DEVICES'))"]


def test_a_task_asks_for_the_gpus_of_its_stage(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from greencode_jax.pipeline.backends.ray import RayBackend

    monkeypatch.chdir(tmp_path)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        backend = RayBackend()
        assert (backend.cpus, backend.gpus, backend.slots) == (1, 1, 1)  # one GPU: one stage at a time
        for gpus, expected in ((None, "visible: 0"), (0, "visible: None")):  # Ray sets it for a GPU task only
            backend = RayBackend(gpus=gpus)
            backend.start(SimpleNamespace(id="probe", plan=SimpleNamespace(hosts=1)), PROBE, tmp_path / "probe.log")
            assert backend.wait()[0][:2] == ("probe", 0)
            assert (tmp_path / "probe.log").read_text().splitlines()[-1] == expected
        assert RayBackend(gpus=0, cpus=1).slots == 2
        with pytest.raises(GreencodeError, match="--gpus-per-stage 2: the Ray cluster has 1 GPUs"):
            RayBackend(gpus=2)
    finally:
        ray.shutdown()
