"""A multi-host stage on the local backend: a sweep's fine-tune stage with `parallel.hosts: 2` runs as two
processes joined by jax.distributed (127.0.0.1, a free port), each with one CPU device, and trains what
one process trains (test_parallel_distributed's equivalence run and tolerances); `hosts` is in no key."""

from __future__ import annotations

import os

import yaml

from greencode_jax.config import load_config
from greencode_jax.pipeline.backends.local import LocalBackend
from greencode_jax.pipeline.plan import plan_stages
from greencode_jax.pipeline.scheduler import run_jobs
from greencode_jax.pipeline.sweep import job_command, plan_sweep, write_job_specs
from greencode_jax.pipeline.sweep_file import read_sweep
from test_train_support import (  # noqa: F401 (fixtures)
    REPO, assert_equivalent_runs, compile_cache, equivalence_config, one_device_run, stdlib_corpus, subprocess_env,
)


def test_a_two_host_finetune_stage_trains_as_one_process_does(one_device_run, stdlib_corpus, compile_cache,
                                                               tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(equivalence_config(stdlib_corpus, tmp_path / "runs", "two")))
    sweep = {"name": "hosts", "base": "base.yaml", "arms": [{"name": "two-hosts", "set": {"parallel.hosts": 2}}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = dict(subprocess_env(compile_cache), PYTHONPATH=str(REPO))  # the workers inherit it: one CPU device each
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)

    plan = plan_sweep(read_sweep("sweep.yaml"))
    finetune = next(job for job in plan.jobs.values() if job.stage == "finetune")
    assert finetune.plan.hosts == 2
    assert finetune.plan.key == plan_stages(load_config("base.yaml"))["finetune"].key  # hosts: in no key
    plan.out.mkdir(parents=True)
    write_job_specs(plan.out, [finetune])
    lines = []
    errors = run_jobs({finetune.id: finetune}, LocalBackend(1), plan.out, lambda job: job_command(plan.out, job),
                      lines.append)
    log = (plan.out / "logs" / f"{finetune.id}.log").read_text()
    assert errors == {} and finetune.done, (errors, log[-3000:])
    assert "on 2 device(s) (data=2, fsdp=1, 2 process(es))" in log, log[-3000:]
    assert log.count("[finetune] done in") == 1  # the primary alone records the stage
    assert_equivalent_runs(one_device_run, finetune.plan.dir / "finetune")
