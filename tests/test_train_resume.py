"""Preemption and exact resume: SIGTERM a `greencode finetune` subprocess mid-run, run the
same command again, and compare with a run that was never interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

import greencode_jax as gc
from greencode_jax.train.metrics import read_metrics
from test_train_support import (  # noqa: F401 (fixtures)
    REPO, cli_command, compile_cache, flat_leaves, model_params, restore_train_state, run_cli, stdlib_corpus, subprocess_env,
    tiny_config, write_config,
)

STEPS = 80


def wait_for_step(metrics_path, step: int, proc, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        if metrics_path.exists():
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.endswith("}")]
            if any(r.get("step", 0) >= step for r in records):
                return
        time.sleep(0.005)
    raise TimeoutError(f"no step {step} in {metrics_path}")


@pytest.mark.slow(reason="three finetune subprocesses, one of which compiles (~15 s on 2 cores)")
def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(stdlib_corpus, compile_cache, tmp_path):
    env = subprocess_env(compile_cache)
    settings = dict(train={"steps": STEPS}, checkpoint={"every": 25, "keep": 2, "async_save": True})
    straight = write_config(tmp_path / "straight.yaml", tiny_config(stdlib_corpus, tmp_path, "straight", **settings))
    broken = write_config(tmp_path / "broken.yaml", tiny_config(stdlib_corpus, tmp_path, "broken", **settings))

    done = run_cli(["finetune", straight], env)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(cli_command("finetune", broken), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "broken" / "metrics.jsonl", 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, f"expected the preempted status 143, got {proc.returncode}: {stderr[-2000:]}"
    assert "stopped by SIGTERM" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "broken" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 10 <= saved[-1] < STEPS, saved  # it stopped mid-run and saved where it stopped
    assert not (tmp_path / "broken" / "final").exists()

    resumed = run_cli(["finetune", broken], env)
    assert resumed.returncode == 0, resumed.stderr

    # the whole train state: parameters, Adam moments and count, step, PRNG key
    a = flat_leaves(restore_train_state(tmp_path / "straight" / "checkpoints", STEPS))
    b = flat_leaves(restore_train_state(tmp_path / "broken" / "checkpoints", STEPS))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert int(a["['step']"]) == STEPS

    # the final checkpoints (what load_pretrained reads) too
    final_a = flat_leaves(model_params(gc.load_pretrained(tmp_path / "straight" / "final")))
    final_b = flat_leaves(model_params(gc.load_pretrained(tmp_path / "broken" / "final")))
    assert all(np.array_equal(final_a[k], final_b[k]) for k in final_a)

    # the metrics read as one run: every step once, with the uninterrupted run's exact losses
    steps_a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r}
    records_b = [r for r in read_metrics(tmp_path / "broken" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records_b] == list(range(1, STEPS + 1))
    assert {r["step"]: r["loss"] for r in records_b} == steps_a
