"""Preemption and exact resume: SIGTERM a `greencode finetune` subprocess mid-run, run the
same command again, and compare with the session's run of the same config that was never
interrupted (`finished_tiny_run`)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import yaml

import greencode_jax as gc
from greencode_jax.metrics_log import read_metrics
from test_train_support import (  # noqa: F401 (fixtures)
    FINISHED_STEPS, REPO, cli_command, compile_cache, finished_tiny_run, flat_leaves, model_params,
    restore_train_state, run_cli, stdlib_corpus, subprocess_env, write_config,
)


def wait_for_step(metrics_path, step: int, proc, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        if metrics_path.exists():
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.endswith("}")]
            if any(r.get("step", 0) >= step for r in records):
                return
        time.sleep(0.002)
    raise TimeoutError(f"no step {step} in {metrics_path}")


def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(finished_tiny_run, compile_cache, tmp_path):
    config = yaml.safe_load((finished_tiny_run.parent / "tiny.yaml").read_text())
    config["run"]["out_dir"] = str(tmp_path)  # the same run (name, seed, data, model, steps) in another place
    broken = write_config(tmp_path / "tiny.yaml", config)
    env = subprocess_env(compile_cache)

    proc = subprocess.Popen(cli_command("finetune", broken), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "tiny" / "metrics.jsonl", 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, f"expected the preempted status 143, got {proc.returncode}: {stderr[-2000:]}"
    saved = sorted(int(p.name) for p in (tmp_path / "tiny" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 10 <= saved[-1] < FINISHED_STEPS, saved  # it stopped mid-run and saved where it stopped
    assert (f"greencode: interrupted by SIGTERM; finetune saved its checkpoint at step {saved[-1]} of "
            f"{FINISHED_STEPS} in {tmp_path / 'tiny'}; the same command resumes at step {saved[-1] + 1}\n") in stderr, \
        stderr
    assert not (tmp_path / "tiny" / "final").exists()

    resumed = run_cli(["finetune", broken], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {saved[-1]}" in resumed.stdout

    # the whole train state: parameters, Adam moments and count, step, PRNG key
    a = flat_leaves(restore_train_state(finished_tiny_run / "checkpoints", FINISHED_STEPS))
    b = flat_leaves(restore_train_state(tmp_path / "tiny" / "checkpoints", FINISHED_STEPS))
    assert a.keys() == b.keys() and int(a["['step']"]) == FINISHED_STEPS
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert np.array_equal(a[key], b[key]), key

    # the final checkpoints (what load_pretrained reads) too
    final_a = flat_leaves(model_params(gc.load_pretrained(finished_tiny_run / "final")))
    final_b = flat_leaves(model_params(gc.load_pretrained(tmp_path / "tiny" / "final")))
    assert all(np.array_equal(final_a[k], final_b[k]) for k in final_a)

    # the metrics read as one run: every step once, with the uninterrupted run's exact losses
    steps_a = {r["step"]: r["loss"] for r in read_metrics(finished_tiny_run / "metrics.jsonl") if "loss" in r}
    records_b = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records_b] == list(range(1, FINISHED_STEPS + 1))
    assert {r["step"]: r["loss"] for r in records_b} == steps_a
