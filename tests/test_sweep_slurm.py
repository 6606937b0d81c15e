"""The SLURM backend on a cluster, with SLURM's commands faked at the vendor boundary (an `sbatch` that
numbers the jobs, an `srun` that is there, a `scancel` that records): the whole stage graph of the
shipped RL ablation submitted at once, checked in the sbatch scripts submitit generates (dependencies,
the job array, the resources) and in the pickled commands the jobs would run. No JAX, no job runs."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import yaml

from greencode_jax.pipeline.scheduler import launch_ready
from greencode_jax.pipeline.sweep import job_command, plan_sweep
from greencode_jax.pipeline.sweep_file import read_sweep

REPO = Path(__file__).resolve().parents[1]
FAKES = {"sbatch": 'n=$(( $(cat "$0.count" 2>/dev/null || echo 100) + 1 )); echo $n > "$0.count"\n'
                   'echo "Submitted batch job $n"\n',
         "srun": "exit 1\n",
         "scancel": 'echo "$@" >> "$0.log"\n',
         # every job asked for is PENDING (an array's tasks too), but those listed in sacct.cancelled
         "sacct": 'echo "JobID|State|NodeList"\nwhile [ $# -gt 0 ]; do\n  if [ "$1" = -j ]; then state=PENDING\n'
                  '    grep -qx "$2" "$0.cancelled" 2>/dev/null && state=CANCELLED\n'
                  '    echo "$2|$state|"; echo "$2_[0-9]|$state|"; shift; fi\n  shift\ndone\n'}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    monkeypatch.setenv("GREENCODE_SLURM_PARTITION", "gpu-a100")
    monkeypatch.setenv("GREENCODE_SLURM_GPUS", "1")
    monkeypatch.setenv("GREENCODE_SLURM_CPUS", "8")
    monkeypatch.setenv("GREENCODE_SLURM_TIME", "90")
    monkeypatch.chdir(tmp_path)  # the store (runs/.stages) and sweeps/ here: nothing is done yet
    return bin_dir


def sbatch_flags(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?$", script, flags=re.M))


def launch(plan, folder: Path):
    """The scheduler's launch of every job of `plan` on a SLURM backend: (backend, jobs left pending)."""
    from greencode_jax.pipeline.backends.slurm import SlurmBackend

    plan.out.mkdir(parents=True, exist_ok=True)
    backend = SlurmBackend(str(folder), cluster="slurm")
    pending = list(plan.jobs.values())
    launch_ready(pending, {}, plan.jobs, backend,
                 lambda job: (job_command(plan.out, job), plan.out / f"{job.id}.log"), lambda line: None)
    return backend, pending


def test_the_whole_graph_is_submitted_at_once_with_dependencies_and_arrays(fake_slurm, tmp_path):
    submitit = pytest.importorskip("submitit")
    plan = plan_sweep(read_sweep(REPO / "configs/sweeps/rl-ablation.yaml"))
    backend, pending = launch(plan, tmp_path / "submitit")
    assert not pending  # every job, without waiting for any

    scripts = {path.parent.name: path.read_text() for path in (tmp_path / "submitit").glob("*/*_submission.sh")}
    flags = {slurm_id: sbatch_flags(text) for slurm_id, text in scripts.items()}
    by_stage = {}
    for slurm_id, flag in sorted(flags.items()):
        by_stage.setdefault(flag["job-name"].removeprefix("greencode-"), []).append(slurm_id)
    # one job per shared stage, one array for the 6 policies (same upstream jobs), one job per certify/evaluate
    assert {stage: len(ids) for stage, ids in by_stage.items()} == {
        "finetune": 1, "calibrate": 1, "rollouts": 1, "policy": 1, "certify": 6, "evaluate": 6}
    (finetune,), (calibrate,), (rollouts,), (policy,) = (by_stage[s] for s in ("finetune", "calibrate", "rollouts",
                                                                                 "policy"))
    assert "dependency" not in flags[finetune]
    assert flags[calibrate]["dependency"] == f"afterok:{finetune}" and "exclusive" in flags[calibrate]
    assert flags[rollouts]["dependency"] == f"afterok:{finetune}" and "exclusive" not in flags[rollouts]
    assert flags[policy]["array"] == "0-5%6"
    assert flags[policy]["dependency"] == f"afterok:{finetune}:{calibrate}:{rollouts}"
    certify_deps = sorted(flags[i]["dependency"] for i in by_stage["certify"])
    assert certify_deps == [f"afterok:{finetune}:{policy}_{task}" for task in range(6)]
    for slurm_id in by_stage["evaluate"]:  # finetune, calibrate, its policy's array task, its certification
        found = re.fullmatch(rf"afterok:{finetune}:{calibrate}:{policy}_(\d):(\d+)", flags[slurm_id]["dependency"])
        assert found and found.group(2) in by_stage["certify"], flags[slurm_id]
    for slurm_id, flag in flags.items():
        assert (flag["partition"], flag["gpus-per-node"], flag["cpus-per-task"], flag["time"], flag["nodes"],
                flag["ntasks-per-node"]) == ("gpu-a100", "1", "8", "90", "1", "1"), scripts[slurm_id]
        assert flag.get("kill-on-invalid-dep") == (None if slurm_id == finetune else "yes")
        assert "-m submitit.core._submit" in scripts[slurm_id]
    # what each job runs: the stage job's command, once per job
    pickles = (tmp_path / "submitit").glob("*/*_submitted.pkl")
    commands = sorted(submitit.core.utils.DelayedSubmission.load(path).args[0] for path in pickles)
    assert commands == sorted(job_command(plan.out, job) for job in plan.jobs.values())

    backend.stop()  # an interrupt: every job cancelled
    cancelled = (fake_slurm / "scancel.log").read_text().split()
    assert sorted(set(cancelled)) == sorted({finetune, calibrate, rollouts, *by_stage["certify"],
                                             *by_stage["evaluate"]} | {f"{policy}_{t}" for t in range(6)})


def test_a_rerun_follows_the_jobs_still_queued_and_submits_the_others(fake_slurm, tmp_path):
    pytest.importorskip("submitit")
    plan = plan_sweep(read_sweep(REPO / "configs/sweeps/rl-ablation.yaml"))
    launch(plan, tmp_path / "submitit")  # a sweep that submitted its jobs, then went (--detach, a lost login)
    scripts = sorted((tmp_path / "submitit").glob("*/*_submission.sh"))
    record = json.loads((tmp_path / "submitit/greencode-jobs.json").read_text())
    assert sorted(record) == sorted(plan.jobs) and len(scripts) == 16
    gone = next(job_id for job_id in record if job_id.startswith("evaluate-"))
    (fake_slurm / "sacct.cancelled").write_text(record[gone] + "\n")
    first = next(path for path in scripts if path.parent.name == record[gone]).read_text()

    backend, pending = launch(plan, tmp_path / "submitit")
    assert not pending
    again = sorted(set((tmp_path / "submitit").glob("*/*_submission.sh")) - set(scripts))
    assert len(again) == 1  # the cancelled job alone, waiting on the same upstream jobs as before
    assert sbatch_flags(again[0].read_text())["dependency"] == sbatch_flags(first)["dependency"]
    renewed = json.loads((tmp_path / "submitit/greencode-jobs.json").read_text())
    assert renewed == dict(record, **{gone: again[0].parent.name})


def test_a_multi_host_stage_asks_for_one_task_per_node(fake_slurm, tmp_path):
    pytest.importorskip("submitit")
    sweep = {"name": "hosts", "base": str(REPO / "configs/quickstart.yaml"), "grid": {"rl.beta": [1.0, 2.0]},
             "arms": [{"name": "multi", "set": {"parallel.hosts": 2, "rl.hosts": 3}}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    backend, _ = launch(plan_sweep(read_sweep(tmp_path / "sweep.yaml")), tmp_path / "submitit")
    scripts = {sbatch_flags(path.read_text())["job-name"].removeprefix("greencode-"): path.read_text()
               for path in (tmp_path / "submitit").glob("*/*_submission.sh")}
    expected_nodes = {"finetune": "2", "calibrate": "1", "rollouts": "1", "policy": "3"}
    for stage, nodes in expected_nodes.items():
        flags = sbatch_flags(scripts[stage])
        assert (flags["nodes"], flags["ntasks-per-node"]) == (nodes, "1"), scripts[stage]
        assert ("--kill-on-bad-exit=1" in scripts[stage]) == (nodes != "1"), scripts[stage]
    assert sbatch_flags(scripts["policy"])["array"] == "0-1%2"  # the two betas' policies, 3 nodes each
    backend.stop()


def test_detach_submits_the_graph_and_returns_where_slurm_can_run_it_alone(fake_slurm, tmp_path, capsys):
    pytest.importorskip("submitit")
    from greencode_jax.cli.main import main
    from greencode_jax.pipeline.backends.slurm import SlurmBackend
    from greencode_jax.pipeline.sweep import submit_sweep

    plan = plan_sweep(read_sweep(REPO / "configs/sweeps/rl-ablation.yaml"))
    assert submit_sweep(plan, SlurmBackend(str(tmp_path / "submitit"), cluster="slurm"), lambda line: None) == 21
    assert len(list((tmp_path / "submitit").glob("*/*_submission.sh"))) == 16
    assert sorted(p.name for p in plan.out.iterdir()) == [".greencode-output.json", "jobs", "logs"]  # no results
    # the local backend (or submitit's local executor) needs this process to order the jobs: one error
    assert main(["sweep", str(REPO / "configs/sweeps/rl-ablation.yaml"), "--detach"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("greencode: error: --detach: only --backend slurm on a SLURM cluster runs the stage jobs "
                           "without this process (its jobs wait on each other in SLURM)")
