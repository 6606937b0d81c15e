"""`collect-rollouts` and `train-policy` as 2 `jax.distributed` processes on localhost CPU (Gloo
collectives, one CPU device each) give what one process gives, write each output once, and an
interrupted 2-process collection resumes. The training comparison is `slow` (run it with
`pytest -m slow tests/test_rl_distributed.py`).

Every process runs the real CLI in a subprocess, with the session's shared compile cache and a
bounded timeout; the processes of a run find each other through GREENCODE_COORDINATOR on
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from greencode_jax.locks import output_lock

from test_parallel_distributed import free_port
from test_rl_collect import setup  # noqa: F401 (fixture: the stdlib corpus and a tiny 4-layer checkpoint)
from test_train_support import REPO, cli_command, compile_cache, stdlib_corpus, subprocess_env  # noqa: F401

TIMEOUT_S = 240
# 12 episodes in 6 chunks of 2: process 0 records chunks 0, 2, 4 and process 1 chunks 1, 3, 5
COLLECT = ["--episodes", 12, "--batch-size", 2, "--chunk-episodes", 2, "--max-context", 40, "--no-progress"]
RL = {"num_envs": 8, "num_steps": 16, "minibatch_size": 64, "total_timesteps": 768, "hidden": [8, 8],
      "checkpoint_every": 2, "seeds": 2}  # 6 updates in 3 blocks, a checkpoint after each; 2 seeds


def start(processes: int, args, cache, **extra) -> list[subprocess.Popen]:
    """`greencode ARGS` as `processes` processes of one jax.distributed run (one plain process for 1)."""
    port = free_port()
    joined = lambda i: {} if processes == 1 else dict(  # noqa: E731
        GREENCODE_COORDINATOR=f"127.0.0.1:{port}", GREENCODE_NUM_PROCESSES=str(processes), GREENCODE_PROCESS_ID=str(i))
    return [subprocess.Popen(cli_command(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(cache, **joined(i), **extra)) for i in range(processes)]


def finish(procs) -> list[tuple[int, str, str]]:
    """(status, stdout, stderr) of each process, every one killed at the shared deadline."""
    deadline = time.monotonic() + TIMEOUT_S
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run(processes: int, args, cache, **extra) -> list[tuple[int, str, str]]:
    results = finish(start(processes, args, cache, **extra))
    for status, _, err in results:
        assert status == 0, err[-3000:]
    return results


def store_files(root) -> dict:
    """Every file of a store by relative path: its bytes (the ownership manifest, which records the
    writing process's PID and time, aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".greencode-output.json"}


def interrupt_process_1(procs, *paths):
    """SIGINT to process 1 once one of `paths` exists, both processes frozen meanwhile: after the signal
    each finishes at most the batch or block it is in."""
    deadline = time.monotonic() + TIMEOUT_S
    while not any(p.exists() for p in paths):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            finish(procs)
            pytest.fail(f"none of {[str(p) for p in paths]} written before the deadline, or a process ended first")
        time.sleep(0.01)
    for p in procs:
        os.kill(p.pid, signal.SIGSTOP)
    os.kill(procs[1].pid, signal.SIGINT)
    for p in procs:
        os.kill(p.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def one_process_store(setup, compile_cache, tmp_path_factory):  # noqa: F811
    _, corpus, ckpt = setup
    out = tmp_path_factory.mktemp("rl_distributed") / "one"
    run(1, ["collect-rollouts", ckpt, "--data", corpus, "--out", out, *COLLECT], compile_cache)
    return out


def test_two_processes_collect_the_store_one_process_collects(setup, one_process_store, compile_cache,  # noqa: F811
                                                              tmp_path):
    _, corpus, ckpt = setup
    out = tmp_path / "two"
    (_, out0, _), (_, out1, _) = run(2, ["collect-rollouts", ckpt, "--data", corpus, "--out", out, *COLLECT],
                                     compile_cache)
    # Each process records its chunks with the program one process runs (one device, the same batch
    # shape): the hidden states too are bit-identical, and so are the statistics and metadata.
    assert store_files(out) == store_files(one_process_store)
    assert "in each of 2 processes, 6 chunk(s) of 2" in out0 and "180 tokens recorded" in out0
    assert "collect-rollouts" not in out1  # the primary speaks for the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no .partial, no lock file left


@pytest.mark.slow  # 16-34 s of three 2-process collections: .ci/run's 20-minute budget
def test_an_interrupted_two_process_collection_resumes(setup, one_process_store, compile_cache,  # noqa: F811
                                                       tmp_path):
    """Ctrl-C reaching process 1 alone: it stops at its next batch, and process 0, once its own chunks are
    written, stops too instead of waiting for process 1's; the same command then records the rest."""
    _, corpus, ckpt = setup
    out = tmp_path / "two"
    args = ["collect-rollouts", ckpt, "--data", corpus, "--out", out, *COLLECT]
    procs = start(2, args, compile_cache)
    chunks = tmp_path / "two.partial" / "chunks"
    interrupt_process_1(procs, chunks / "00000", chunks / "00001")
    (status0, _, err0), (status1, _, err1) = finish(procs)
    assert status1 == 130 and "interrupted by SIGINT; collect-rollouts kept" in err1, err1[-3000:]
    assert status0 == 2 and "process 1 of the run stopped (interrupted by SIGINT)" in err0, err0[-3000:]
    kept = sorted(p.name for p in chunks.iterdir() if p.name.isdigit())
    assert 1 <= len(kept) < 6 and not out.exists()

    (_, out0, _), _ = run(2, args, compile_cache)
    assert f"resuming, {len(kept)} chunk(s) done" in out0
    assert store_files(out) == store_files(one_process_store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


def test_an_output_locked_by_another_command_is_every_process_s_error(setup, compile_cache, tmp_path):  # noqa: F811
    """Only the primary takes the output's lock; that another command holds it is still every process's
    one-line error (not the primary's alone, with the others left waiting for it at a barrier)."""
    _, corpus, ckpt = setup
    out = tmp_path / "two"
    with output_lock(out):  # what a second command writing the same store would meet
        (status0, _, err0), (status1, _, err1) = finish(start(
            2, ["collect-rollouts", ckpt, "--data", corpus, "--out", out, *COLLECT], compile_cache))
    assert status0 == 2 and f"{out}: another greencode command is writing it (PID {os.getpid()}" in err0, err0
    assert status1 == 2 and f"{out}: the primary process could not lock it" in err1, err1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # three CLI trainings, each compiling PPO: 60 to 110 s on this shared CPU
def test_two_processes_train_the_policy_one_process_trains_on_two_devices_and_resume(one_process_store,
                                                                                     compile_cache, tmp_path):
    """Ctrl-C reaching process 1 alone stops both after the same block and its checkpoint; the same command
    then finishes the training, which is the training of one process on two devices."""
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump({"rl": RL}))
    args = lambda out: ["train-policy", one_process_store, "--out", out, "--config", config,  # noqa: E731
                        "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(1, args(one), compile_cache, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = start(2, args(two), compile_cache)
    interrupt_process_1(procs, tmp_path / "two.partial" / "checkpoints" / "2")
    (status0, _, err0), (status1, _, err1) = finish(procs)
    resumes = r"train-policy kept its checkpoint after update (2|4) of 6 in .*; the same command resumes at update"
    assert status1 == 130 and re.search("interrupted by SIGINT; " + resumes, err1), err1[-3000:]
    assert status0 == 143 and re.search("interrupted by SIGTERM; " + resumes, err0), err0[-3000:]
    assert not two.exists()

    (_, out0, _), (_, out1, _) = run(2, args(two), compile_cache)
    assert "2 device(s) in 2 processes; resuming after update" in out0 and "train-policy" not in out1
    # The same program (PPO under shard_map over data=2) on the same mesh shape; its only cross-device
    # arithmetic is psum / pmean over two devices, and a sum of two floats is the same whichever device
    # adds: every learned number is bit-identical, not merely close. Only the timings differ.
    assert (two / "actor.safetensors").read_bytes() == (one / "actor.safetensors").read_bytes()
    assert (two / "validation.json").read_text() == (one / "validation.json").read_text()
    untimed = lambda text: [{k: v for k, v in json.loads(line).items() if k != "timesteps_per_s"}  # noqa: E731
                            for line in text.splitlines()]
    lines = untimed((two / "metrics.jsonl").read_text())
    assert lines == untimed((one / "metrics.jsonl").read_text())
    # written once: one line per update and seed (not one per process), and nothing else left behind
    assert [(r["update"], r["seed"]) for r in lines] == [(u, s) for u in range(1, 7) for s in (0, 1)]
    policies = [json.loads((d / "policy.json").read_text()) for d in (one, two)]
    for policy in policies:
        for timed in ("seconds", "first_block_seconds"):
            policy["result"].pop(timed)
    assert policies[0] == policies[1]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir()) == [
        ".greencode-output.json", "actor.safetensors", "metrics.jsonl", "policy.json", "validation.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "rl.yaml", "two"]
