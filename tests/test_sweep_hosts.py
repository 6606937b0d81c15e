"""Multi-host stages: a sweep's fine-tune stage with `parallel.hosts: 2` runs as two processes joined by
jax.distributed, each with one CPU device, and trains what one process trains (test_parallel_distributed's
equivalence run and tolerances): on the local backend (127.0.0.1, a free port) and, slow, as two Ray
tasks in a placement group on a local Ray cluster the test starts and stops. `hosts` is in no key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from greencode_jax.config import load_config
from greencode_jax.pipeline.plan import plan_stages
from greencode_jax.pipeline.scheduler import run_jobs
from greencode_jax.pipeline.sweep import job_command, plan_sweep, write_job_specs
from greencode_jax.pipeline.sweep_file import read_sweep
from test_train_support import (  # noqa: F401 (fixtures)
    REPO, assert_equivalent_runs, compile_cache, equivalence_config, one_device_run, stdlib_corpus, subprocess_env,
)


@pytest.fixture
def two_host_world(stdlib_corpus, compile_cache, tmp_path, monkeypatch) -> Path:
    """A sweep of one arm, the equivalence run with parallel.hosts: 2, in `tmp_path` (the working directory),
    with the environment the workers inherit: one CPU device each, the shared compile cache."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(equivalence_config(stdlib_corpus, tmp_path / "runs", "two")))
    sweep = {"name": "hosts", "base": "base.yaml", "arms": [{"name": "two-hosts", "set": {"parallel.hosts": 2}}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = dict(subprocess_env(compile_cache), PYTHONPATH=str(REPO))
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_the_finetune_stage(backend, one_device_run):
    plan = plan_sweep(read_sweep("sweep.yaml"))
    finetune = next(job for job in plan.jobs.values() if job.stage == "finetune")
    assert finetune.plan.hosts == 2
    assert finetune.plan.key == plan_stages(load_config("base.yaml"))["finetune"].key  # hosts: in no key
    plan.out.mkdir(parents=True)
    write_job_specs(plan.out, [finetune])
    errors = run_jobs({finetune.id: finetune}, backend, plan.out, lambda job: job_command(plan.out, job),
                      lambda line: None)
    log = (plan.out / "logs" / f"{finetune.id}.log").read_text()
    assert errors == {} and finetune.done, (errors, log[-3000:])
    assert "on 2 device(s) (data=2, fsdp=1, 2 process(es))" in log, log[-3000:]
    assert log.count("[finetune] done in") == 1  # the primary alone records the stage
    assert_equivalent_runs(one_device_run, finetune.plan.dir / "finetune")


@pytest.mark.slow  # 30 s of two fine-tune processes plus the one-process reference: .ci/run's 20-minute budget
def test_a_two_host_finetune_stage_on_the_local_backend_trains_as_one_process_does(two_host_world,
                                                                                    one_device_run):
    from greencode_jax.pipeline.backends.local import LocalBackend

    run_the_finetune_stage(LocalBackend(1), one_device_run)


@pytest.mark.slow
def test_a_two_host_finetune_stage_as_ray_tasks_trains_as_one_process_does(two_host_world, one_device_run):
    ray = pytest.importorskip("ray")
    from greencode_jax.pipeline.backends.ray import RayBackend

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        backend = RayBackend()
        assert backend.strategy == "PACK" and (backend.cpus, backend.gpus) == (1, 0)
        run_the_finetune_stage(backend, one_device_run)
        assert ray.util.placement_group_table() and all(  # the job's placement group is given back
            group["state"] == "REMOVED" for group in ray.util.placement_group_table().values())
    finally:
        ray.shutdown()
