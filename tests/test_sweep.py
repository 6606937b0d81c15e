"""`greencode sweep`: bad sweep files, the dry run, and one small sweep on the local backend whose stages
are shared across arms (counted from the jobs' logs), with a failing arm beside the others."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from greencode_jax.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import (REPO, chain_config, compile_cache, stdlib_corpus, subprocess_env,  # noqa: E402,F401
                                write_chain_cost)

# Three arms on the tiny chain: two values of beta share the fine-tune, calibration and rollouts; the third
# names a cost model that is not there, so its policy stage fails while the others go on.
SWEEP = {"name": "tiny", "base": "chain.yaml",
         "arms": [{"set": {"rl.beta": 1.0}}, {"set": {"rl.beta": 2.0}},
                  {"name": "broken", "set": {"rl.reward": "energy", "rl.cost_model": "no-such-cost.json"}}]}


def write_world(root: Path, corpus: Path, sweep: dict = SWEEP) -> Path:
    cost = write_chain_cost(corpus, root / "cost.json")
    config = chain_config(corpus, cost, policies="full; learned@0.5", samples=2)
    (root / "chain.yaml").write_text(yaml.safe_dump(config))
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return root / "sweep.yaml"


def sweep_cli(args, cwd: Path, env: dict, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greencode_jax.cli.main", "sweep", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(compile_cache) -> dict:
    return dict(subprocess_env(compile_cache), PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, stdlib_corpus, env) -> tuple[Path, subprocess.CompletedProcess]:
    """The small sweep, run once on the local backend (two jobs at once)."""
    root = tmp_path_factory.mktemp("sweep")
    write_world(root, stdlib_corpus)
    return root, sweep_cli(["sweep.yaml", "--jobs", "2"], root, env)


def launches(root: Path) -> dict:
    """How many times each stage ran: one log per launched job, one "[stage] ... done in" per finished run."""
    counts = {}
    for log in (root / "sweeps/tiny/logs").glob("*.log"):
        stage = log.name.split("-")[0]
        counts[stage] = counts.get(stage, 0) + log.read_text().count(f"[{stage}] done in")
    return counts


def test_each_shared_stage_runs_once_and_a_failing_arm_leaves_the_others(swept):
    root, result = swept
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("greencode: error:")]
    assert len(error) == 1 and "1 of 3 runs failed" in error[0] and "broken: [policy] " in error[0], result.stderr
    assert "no-such-cost.json" in error[0], error
    assert launches(root) == {"finetune": 1, "calibrate": 1, "rollouts": 1, "policy": 2, "certify": 2,
                              "evaluate": 2}
    status = json.loads(next((root / "runs/.stages").glob("policy-*/status.json")).read_text())
    assert status["status"] in ("done", "failed")
    # the table: one row per finished arm x policy, its figures those of the arm's own summary.json
    rows = list(csv.DictReader((root / "sweeps/tiny/summary.csv").open()))
    summaries = {arm: json.loads((root / "sweeps/tiny/runs" / arm / "evaluate/summary.json").read_text())
                 for arm in ("beta=1.0", "beta=2.0")}
    assert sorted((r["arm"], r["policy"]) for r in rows) == sorted(
        (arm, key) for arm, summary in summaries.items() for key in summary["protocols"]["completion"]["policies"])
    assert {"full", "learned@0.5"} <= {r["policy"] for r in rows}
    for row in rows:
        policy = summaries[row["arm"]]["protocols"]["completion"]["policies"][row["policy"]]
        assert float(row["rouge_l"]) == pytest.approx(policy["metrics"]["rouge_l"]["mean"], rel=1e-5)  # 6 digits
        assert float(row["saved_modelled_pct"]) == pytest.approx(policy["saved_vs_full"]["modelled"], rel=1e-5,
                                                                 abs=1e-9)
        assert float(row["rl.beta"]) == float(row["arm"].split("=")[1])
    report = (root / "sweeps/tiny/report.md").read_text()
    assert "**failed**: broken: [policy]" in report and "| rl.beta | 1.0 | 1 |" in report, report
    assert (root / "sweeps/tiny/pareto.png").read_bytes().startswith(b"\x89PNG")
    assert "| beta=2.0 | learned@0.5 |" in result.stdout  # the command ends with the table
    # the calibration measures the machine: it ran alone, though two jobs may run at once
    events = [line for line in result.stdout.splitlines() if line.startswith("[") and " started (" in line
              or " done in " in line]
    start = next(i for i, line in enumerate(events) if line.startswith("[calibrate]"))
    assert events[start + 1].startswith("[calibrate]") and "done in" in events[start + 1], events
    assert sum(" started (" in line for line in events[:start]) == sum(" done in " in line for line in events[:start])


def test_a_rerun_launches_only_what_failed_and_shares_with_greencode_run(swept, env):
    root, _ = swept
    before = {log.name: log.read_text() for log in (root / "sweeps/tiny/logs").glob("*.log")}
    again = sweep_cli(["sweep.yaml"], root, env)
    assert again.returncode == 2 and "1 of 3 runs failed" in again.stderr, again.stderr
    changed = [name for name, text in before.items() if (root / "sweeps/tiny/logs" / name).read_text() != text]
    assert len(changed) == 1 and changed[0].startswith("policy-"), changed  # only the broken arm's policy, again
    assert "9 of 12 stage jobs are done in the store already" in again.stdout, again.stdout
    # `greencode run` of an arm's config finds every stage done
    run = subprocess.run([sys.executable, "-m", "greencode_jax.cli.main", "run", "chain.yaml", "rl.beta=2.0",
                          "run.name=by-hand"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.count("up to date") == 6, run.stdout + run.stderr


def test_the_dry_run_shows_what_is_shared_and_runs_nothing_without_jax(tmp_path, stdlib_corpus, env):
    write_world(tmp_path, stdlib_corpus)
    script = ("import sys\nfrom greencode_jax.cli.main import main\ncode = main(['sweep', 'sweep.yaml', '--dry-run'])\n"
              "print('jax loaded:', 'jax' in sys.modules)\nsys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 arms x 1 seed(s) = 3 runs" in out, out
    assert ["broken", "rl.reward=energy", "rl.cost_model=no-such-cost.json"] in [line.split() for line in
                                                                                 out.splitlines()], out
    assert "stage jobs: 12 (0 done in runs/.stages), instead of 18 without sharing" in out, out
    jobs = [line.split() for line in out.splitlines() if line.startswith("  ") and "-" in line.split()[0][:12]]
    shared = {job[0].split("-")[0]: job for job in jobs if job[-2:] == ["all", "runs"]}
    assert set(shared) == {"finetune", "calibrate", "rollouts"}, jobs  # the later stages: one job per arm
    assert sorted(job[-1] for job in jobs if job[0].startswith("policy-")) == ["beta=1.0", "beta=2.0", "broken"]
    assert "jax loaded: False" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("sweep, expected", [
    ({"arms": [{"name": "a", "set": {"rl.bta": 2}}]}, ("arm 'a': ", "unknown field 'rl.bta' (did you mean 'beta'?)")),
    ({"grid": {}}, ("'grid' must map section.field to a non-empty list of values",)),
    ({"grid": {"rl.beta": []}}, ("grid field 'rl.beta' has []; expected a non-empty list",)),
    ({"arms": [{"name": "x", "set": {}}, {"name": "x", "set": {"rl.beta": 2}}]}, ("two arms are named 'x'",)),
    ({"base": "nothere.yaml"}, ("base nothere.yaml is not there",)),
    ({"base": "broken.yaml"}, ("base broken.yaml does not load: ", "unknown section 'trian'")),
    ({"grid": {"rl.beta": ["high"]}}, ("arm 'beta=high': ", "field 'rl.beta' is 'high', expected float")),
    ({"zip": {"rl.beta": [1, 2], "rl.learning_rate": [0.1]}}, ("the zip lists differ in length",)),
    ({"gird": {"rl.beta": [1]}}, ("unknown key 'gird' (did you mean 'grid'?)",)),
    ({"seeds": [0, "one"]}, ("'seeds' is [0, 'one']; expected a non-empty list of integers",)),
    ({"grid": {"parallel.hosts": [2, 0]}}, ("arm 'hosts=0': ", "parallel.hosts=0: expected a positive integer")),
])
def test_a_bad_sweep_file_is_one_error_before_anything_runs(sweep, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("rl: {beta: 4}\n")
    (tmp_path / "broken.yaml").write_text("trian: {steps: 3}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", **sweep}))
    assert main(["sweep", "s.yaml"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("greencode: error: s.yaml: "), err
    assert all(part in err for part in expected), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "broken.yaml", "s.yaml"]  # nothing written


def deterministic_rows(root: Path) -> list[dict]:
    """summary.csv less its timed figures (measured joules and what is derived from them)."""
    rows = csv.DictReader((root / "sweeps/tiny/summary.csv").open())
    return sorted(({k: v for k, v in row.items() if "measured" not in k} for row in rows),
                  key=lambda r: (r["arm"], r["policy"]))


@pytest.mark.slow
def test_the_ray_backend_gives_the_local_summary(swept, stdlib_corpus, env, tmp_path, monkeypatch, capsys):
    """On a local Ray cluster this test starts (127.0.0.1, 2 CPUs) and stops: the same table, the same
    compiled programs on the same machine giving bit-identical deterministic figures."""
    ray = pytest.importorskip("ray")
    write_world(tmp_path, stdlib_corpus)
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():  # the Ray workers inherit the environment of the cluster's start
        monkeypatch.setenv(name, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        assert main(["sweep", "sweep.yaml", "--backend", "ray"]) == 2  # the broken arm, as on the local backend
    finally:
        ray.shutdown()
    assert "broken: [policy] " in capsys.readouterr().err
    assert launches(tmp_path) == launches(swept[0])
    assert deterministic_rows(tmp_path) == deterministic_rows(swept[0])


@pytest.mark.slow
def test_the_slurm_backend_through_submitits_local_executor_gives_the_local_summary(swept, stdlib_corpus, env,
                                                                                    tmp_path):
    write_world(tmp_path, stdlib_corpus)
    result = sweep_cli(["sweep.yaml", "--backend", "slurm"], tmp_path, env)
    assert result.returncode == 2 and "broken: [policy] " in result.stderr, result.stderr
    assert launches(tmp_path) == launches(swept[0])
    assert deterministic_rows(tmp_path) == deterministic_rows(swept[0])
    assert list((tmp_path / "sweeps/.submitit").glob("*/*_submission.sh")) or list(
        (tmp_path / "sweeps/.submitit").glob("*/*.pkl")), "submitit wrote no job files"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs/sweeps").glob("*.yaml")))
def test_every_shipped_sweep_loads_and_plans(name):
    from greencode_jax.pipeline.sweep import plan_sweep
    from greencode_jax.pipeline.sweep_file import read_sweep

    plan = plan_sweep(read_sweep(REPO / "configs/sweeps" / name))
    assert len(plan.sweep.runs) >= 4 and all(len(job.runs) >= 1 for job in plan.jobs.values())


def _wait_for(condition, process: subprocess.Popen, seconds: float = 600):
    """Polls `condition` (bounded in time) while `process` runs; returns its first true value."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, "the sweep ended before the awaited moment"
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _policy_with_a_checkpoint(root: Path, not_pid: int | None = None):
    """The store directory of a policy job that is running (in a worker other than `not_pid`) and has a
    PPO checkpoint."""
    for directory in (root / "runs/.stages").glob("policy-*"):
        status = json.loads((directory / "status.json").read_text()) if (directory / "status.json").exists() else {}
        checkpoints = directory / "policy.partial" / "checkpoints"
        saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())  # a whole checkpoint
        if status.get("status") == "running" and status.get("pid") != not_pid and saved:
            return directory, status["pid"]
    return None


@pytest.mark.slow
def test_a_killed_worker_fails_its_arm_ctrl_c_stops_the_workers_and_a_rerun_resumes(stdlib_corpus, env, tmp_path):
    import os
    import signal

    cost = write_chain_cost(stdlib_corpus, tmp_path / "cost.json")
    config = chain_config(stdlib_corpus, cost, policies="full; learned@0.5", samples=2, timesteps=8 * 16 * 120)
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(config))  # a policy stage long enough to interrupt
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**SWEEP, "arms": SWEEP["arms"][:2]}))
    command = [sys.executable, "-m", "greencode_jax.cli.main", "sweep", "sweep.yaml"]

    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, pid = _wait_for(lambda: _policy_with_a_checkpoint(tmp_path), sweep)
    os.kill(pid, signal.SIGKILL)  # a worker dies (out of memory, a lost node)
    out, err = sweep.communicate(timeout=900)
    assert sweep.returncode == 2 and f"[policy] {killed.name} FAILED: exit status -9" in out, out + err
    assert "runs failed" in err and "exit status -9" in err, err

    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    again, pid = _wait_for(lambda: _policy_with_a_checkpoint(tmp_path, not_pid=pid), sweep)  # (the killed
    # worker's status still says running: a status is a record, the lease is the lock)
    log = tmp_path / "sweeps/tiny/logs" / f"{again.name}.log"
    _wait_for(lambda: "resuming after update" in log.read_text(errors="replace"), sweep)  # it resumed
    sweep.send_signal(signal.SIGINT)  # Ctrl-C: the sweep stops its workers, each at a clean point
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 130 and err.strip().splitlines()[-1].startswith("greencode: interrupted by SIGINT"), err
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone
    assert json.loads((again / "status.json").read_text())["status"] == "stopped"

    last = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert last.returncode == 0, last.stdout + last.stderr
    logs = {p.name: p.read_text() for p in (tmp_path / "sweeps/tiny/logs").glob("policy-*.log")}
    assert all("resuming after update" in text for name, text in logs.items() if name.startswith(killed.name)), logs
    assert len(list(csv.DictReader((tmp_path / "sweeps/tiny/summary.csv").open()))) > 0


def test_the_paper_sweep_arms_are_the_four_shipped_configs():
    """Each arm of configs/sweeps/paper-models.yaml, its run section aside, is the shipped config of its name."""
    from greencode_jax.config import load_config
    from greencode_jax.pipeline.sweep_file import read_sweep

    sweep = read_sweep(REPO / "configs/sweeps/paper-models.yaml")
    assert [run.arm for run in sweep.runs] == ["llama3.2-3b-python", "llama3.2-3b-java", "opt-2.7b-python",
                                               "opt-2.7b-java"]
    for run in sweep.runs:
        shipped = load_config(REPO / "configs" / f"{run.arm}.yaml").mapping
        assert {k: v for k, v in run.config.mapping.items() if k != "run"} == \
            {k: v for k, v in shipped.items() if k != "run"}, run.arm


@pytest.mark.slow
def test_rollouts_and_ppo_as_two_processes_each_in_a_sweep(swept, stdlib_corpus, env, tmp_path):
    """One arm with rollouts.hosts and rl.hosts 2 on the local backend: each stage runs as 2 processes, and
    the rollout store is the 1-process sweep's bit for bit (each process records its chunks with the program
    one process runs: test_rl_distributed). PPO's 2-process numbers are test_rl_distributed's to compare (one
    process on two devices); here, that the stage ran as 2 processes and its arm finished."""
    write_world(tmp_path, stdlib_corpus, {"name": "tiny", "base": "chain.yaml", "arms": [
        {"name": "two-hosts", "set": {"rl.beta": 1.0, "rollouts.hosts": 2, "rl.hosts": 2}}]})
    result = sweep_cli(["sweep.yaml"], tmp_path, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    logs = {log.name.split("-")[0]: log.read_text() for log in (tmp_path / "sweeps/tiny/logs").glob("*.log")}
    assert logs["rollouts"].count(" in each of 2 processes, ") == 2, logs["rollouts"]  # training + validation
    assert " in 2 processes" in logs["policy"] and logs["policy"].count("[policy] done in") == 1, logs["policy"]
    one = next((swept[0] / "runs/.stages").glob("rollouts-*")) / "rollouts"
    two = tmp_path / "runs/.stages" / one.parent.name / "rollouts"  # the same key: hosts is in none

    def files(root: Path) -> dict:
        """Every file's bytes, the stores' metadata parsed with the model's path relative to the sweep's
        directory; the ownership manifests (which record the writing process) aside."""
        out = {}
        for path in sorted(root.rglob("*")):
            if path.name == "rollouts.json":
                meta = json.loads(path.read_text())
                meta["model"]["checkpoint"] = str(Path(meta["model"]["checkpoint"]).relative_to(root.parents[2]))
                out[str(path.relative_to(root))] = meta
            elif path.is_file() and path.name != ".greencode-output.json":
                out[str(path.relative_to(root))] = path.read_bytes()
        return out

    assert files(two) == files(one) and len(files(one)) == 16
    assert (tmp_path / "sweeps/tiny/runs/two-hosts/evaluate/summary.json").exists()
