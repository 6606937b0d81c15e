"""Ctrl-C and SIGTERM end every long command cleanly: `greencode` subprocesses are signalled once
they have made progress, then must exit 130 (SIGINT) or 143 (SIGTERM), never 139 (a crash) or 2,
with one stderr line saying what was kept, no traceback and no temporary leftovers; the same
command then finishes, with what an uninterrupted run gives. Also: PPO that diverges stops at
the first non-finite value, saving nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import greencode_jax as gc
from greencode_jax import interrupts
from greencode_jax.interrupts import Interrupted, SafePoints
from greencode_jax.locks import lock_path
from greencode_jax.models import ModelConfig, init_model
from greencode_jax.config import RLSection
from greencode_jax.rl.store import RolloutStore
from greencode_jax.rl.train import train_policy

sys.path.insert(0, str(Path(__file__).parent))
from rl_helpers import synthetic_arrays, write_synthetic_store  # noqa: E402
from test_train_support import (  # noqa: E402,F401 (fixtures)
    REPO, chain_config, compile_cache, stdlib_corpus, subprocess_env, write_chain_cost,
)

CLI = [sys.executable, "-m", "greencode_jax.cli.main"]
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[")  # tqdm, on stderr in `greencode run`'s later stages
# PPO on the synthetic store: 40 updates in blocks of 2, a checkpoint after each
PPO = ["rl.num_envs=16", "rl.num_steps=32", "rl.minibatch_size=128", "rl.hidden=[16,16]", "rl.checkpoint_every=2",
       f"rl.total_timesteps={16 * 32 * 40}"]


@pytest.fixture(scope="module")
def env(compile_cache):
    return subprocess_env(compile_cache)


@pytest.fixture(scope="module")
def checkpoint(stdlib_corpus, tmp_path_factory) -> Path:
    """A tiny random Llama over the session corpus's vocabulary, one decision exit (layer 0)."""
    from greencode_jax.data.prepared import PreparedData

    tok = PreparedData(stdlib_corpus).tokenizer()
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      eos_token_id=tok.eos_id), exit_layers=[0, 1])
    return gc.save_checkpoint(init_model(config, seed=5), tmp_path_factory.mktemp("interrupts") / "ckpt")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("interrupts_rl") / "train", synthetic_arrays())


class Command:
    """A `greencode` subprocess, its output in files (a pipe left unread could fill and stall it)."""

    def __init__(self, args, env, logs: Path, cwd=REPO):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
        self.proc = subprocess.Popen([*CLI, *map(str, args)], env=env, cwd=cwd, stdout=self.out, stderr=self.err)

    def wait_for(self, ready, timeout=180.0, poll=0.002):
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before it was signalled: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout} s: {self.stderr()[-2000:]}")
            time.sleep(poll)

    def signal(self, sig, then=None):
        self.proc.send_signal(sig)
        if then is not None:
            time.sleep(0.005)
            self.proc.send_signal(then)
        return self.finish()

    def finish(self, timeout=180) -> int:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def stdout(self) -> str:
        return (self.logs / "stdout").read_text()

    def stderr(self) -> str:
        return (self.logs / "stderr").read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.out.close()
        self.err.close()


def run(args, env, logs: Path, cwd=REPO, timeout=300) -> Command:
    command = Command(args, env, logs, cwd)
    try:
        command.finish(timeout)
    finally:
        command.close()
    return command


def the_line(command: Command, status: int, prefix: str) -> str:
    """The one stderr line of an interrupted command (progress bars aside), after its status."""
    err = command.stderr()
    assert command.proc.returncode == status, f"status {command.proc.returncode}, expected {status}: {err[-3000:]}"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith((".tmp", "orbax-checkpoint-tmp"))
                  or ".tmp-" in p.name or "orbax-checkpoint-tmp" in p.name)


def test_evaluate_stops_between_batches_and_the_same_command_resumes(checkpoint, stdlib_corpus, env, tmp_path):
    args = ["evaluate", checkpoint, "--data", stdlib_corpus, "--samples", 12, "--batch-size", 1, "--protocols",
            "completion", "--policies", "full; fixed:0; confidence:softmax_max@0.5", "--no-progress"]
    out = tmp_path / "eval"
    records = out / "samples.jsonl"
    command = Command([*args, "--out", out], env, tmp_path / "first")
    try:
        command.wait_for(lambda: records.is_file() and records.read_text().count("\n") >= 1)
        command.signal(signal.SIGINT)
    finally:
        command.close()
    kept = records.read_text().splitlines()
    line = the_line(command, 130, "greencode: interrupted by SIGINT; evaluate kept ")
    assert line == (f"greencode: interrupted by SIGINT; evaluate kept {len(kept)} of 36 records in {records}; "
                    "the same command resumes"), line
    assert 1 <= len(kept) < 36 and not (out / "summary.json").exists() and not leftovers(tmp_path)

    resumed = run([*args, "--out", out], env, tmp_path / "again")
    assert resumed.proc.returncode == 0, resumed.stderr()
    assert records.read_text().splitlines()[:len(kept)] == kept  # the records kept are kept as they were
    whole = run([*args, "--out", tmp_path / "whole"], env, tmp_path / "whole_logs")
    assert whole.proc.returncode == 0, whole.stderr()

    def decoded(path):  # what a resumed evaluation must repeat exactly (timing and measured joules aside)
        rows = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
        return {(r["policy"], r["sample"]): (r["token_ids"], r["exit_layers"], r["prediction"], r["metrics"],
                                             r["energy"]["modelled"]) for r in rows}

    assert decoded(out) == decoded(tmp_path / "whole") and len(decoded(out)) == 36


def test_evaluate_sigterm_while_loading_exits_143_with_one_line(checkpoint, stdlib_corpus, env, tmp_path):
    out = tmp_path / "eval"
    command = Command(["evaluate", checkpoint, "--data", stdlib_corpus, "--out", out, "--samples", 4,
                       "--protocols", "completion", "--policies", "full", "--no-progress"], env, tmp_path / "logs")
    try:
        command.wait_for(lambda: lock_path(out).exists())  # the command has started: it is loading
        command.signal(signal.SIGTERM)
    finally:
        command.close()
    the_line(command, 143, "greencode: interrupted by SIGTERM")
    assert not leftovers(tmp_path)


def _saved(partial: Path) -> list[int]:
    return sorted(int(p.name) for p in (partial / "checkpoints").iterdir() if p.name.isdigit())


def test_train_policy_sigterm_during_a_save_keeps_that_checkpoint_and_resumes_bit_identically(store, env, tmp_path):
    out = tmp_path / "policy"
    checkpoints = tmp_path / "policy.partial" / "checkpoints"

    def saving():
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        return any("orbax-checkpoint-tmp" in n for n in names)

    command = Command(["train-policy", store, "--out", out, "--no-progress", *PPO], env, tmp_path / "first")
    try:
        command.wait_for(saving, poll=0.0002)
        command.signal(signal.SIGTERM)
    finally:
        command.close()
    saved = _saved(tmp_path / "policy.partial")
    line = the_line(command, 143, "greencode: interrupted by SIGTERM; ")
    # the checkpoint being written when the signal came is finished, and the line names it
    assert len(saved) == 1 and 2 <= saved[0] < 40, saved
    assert line == (f"greencode: interrupted by SIGTERM; train-policy kept its checkpoint after update {saved[0]} of "
                    f"40 in {tmp_path / 'policy.partial'}; the same command resumes at update {saved[0] + 1}"), line
    assert not leftovers(tmp_path) and not out.exists()

    resumed = run(["train-policy", store, "--out", out, "--no-progress", *PPO], env, tmp_path / "again")
    assert resumed.proc.returncode == 0, resumed.stderr()
    assert f"resuming after update {saved[0]}" in resumed.stdout()
    whole = run(["train-policy", store, "--out", tmp_path / "whole", "--no-progress", *PPO], env, tmp_path / "ref")
    assert whole.proc.returncode == 0, whole.stderr()
    assert (out / "actor.safetensors").read_bytes() == (tmp_path / "whole" / "actor.safetensors").read_bytes()

    def learned(path):  # timesteps/s differ between runs; every learned number must not
        return [{k: v for k, v in json.loads(row).items() if k != "timesteps_per_s"}
                for row in (path / "metrics.jsonl").read_text().splitlines()]

    assert learned(out) == learned(tmp_path / "whole") and len(learned(out)) == 40
    assert sorted(p.name for p in tmp_path.iterdir() if "policy" in p.name) == ["policy"]  # no .partial left


def test_train_policy_ctrl_c_twice_stops_at_once_and_leaves_no_half_checkpoint(store, env, tmp_path):
    out = tmp_path / "policy"
    partial = tmp_path / "policy.partial"
    command = Command(["train-policy", store, "--out", out, "--no-progress", *PPO], env, tmp_path / "logs")
    try:
        command.wait_for(lambda: (partial / "checkpoints").is_dir() and _saved(partial))
        command.signal(signal.SIGINT, then=signal.SIGINT)
    finally:
        command.close()
    saved = _saved(partial)
    line = the_line(command, 130, "greencode: interrupted by SIGINT; ")
    assert f"train-policy kept its checkpoint after update {saved[-1]} of 40 in {partial}" in line, (line, saved)
    assert not leftovers(tmp_path)


def test_collect_rollouts_stops_between_batches_keeping_whole_chunks(checkpoint, stdlib_corpus, env, tmp_path):
    args = ["collect-rollouts", checkpoint, "--data", stdlib_corpus, "--episodes", 48, "--batch-size", 2,
            "--chunk-episodes", 4, "--max-context", 40, "--new-tokens", 6, "--no-progress"]
    out = tmp_path / "rollouts"
    chunks = tmp_path / "rollouts.partial" / "chunks"
    command = Command([*args, "--out", out], env, tmp_path / "first")
    try:
        command.wait_for(lambda: chunks.is_dir() and any(p.name.isdigit() for p in chunks.iterdir()))
        command.signal(signal.SIGTERM)
    finally:
        command.close()
    kept = sorted(p.name for p in chunks.iterdir())
    line = the_line(command, 143, "greencode: interrupted by SIGTERM; ")
    assert line == (f"greencode: interrupted by SIGTERM; collect-rollouts kept {len(kept)} of 12 chunks in "
                    f"{tmp_path / 'rollouts.partial'}; the same command records the rest"), (line, kept)
    assert 1 <= len(kept) < 12 and all(name.isdigit() for name in kept) and not leftovers(tmp_path)

    resumed = run([*args, "--out", out], env, tmp_path / "again")
    assert resumed.proc.returncode == 0, resumed.stderr()
    whole = run([*args, "--out", tmp_path / "whole"], env, tmp_path / "whole_logs")
    assert whole.proc.returncode == 0, whole.stderr()
    a, b = RolloutStore(out), RolloutStore(tmp_path / "whole")
    for name in ("hidden", "agree", "confidence", "tokens"):
        np.testing.assert_array_equal(np.asarray(a.array(name)), np.asarray(b.array(name)), err_msg=name)


def test_run_interrupted_in_the_policy_stage_says_so_in_one_line_and_resumes(stdlib_corpus, env, tmp_path):
    cost = write_chain_cost(stdlib_corpus, tmp_path / "cost.json")
    # the tiny chain, with a policy stage long enough to interrupt
    config = chain_config(stdlib_corpus, cost, policies="full; learned@0.5", samples=2, timesteps=8 * 16 * 120)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    from greencode_jax.config import load_config
    from greencode_jax.pipeline.plan import plan_stages

    policy_dir = plan_stages(load_config(path))["policy"].dir  # runs/.stages/policy-KEY: its stage directory
    partial = tmp_path / policy_dir / "policy.partial"
    command = Command(["run", path], env, tmp_path / "first", cwd=tmp_path)
    try:
        command.wait_for(lambda: (partial / "checkpoints").is_dir() and _saved(partial))
        command.signal(signal.SIGTERM)
    finally:
        command.close()
    saved = _saved(partial)
    line = the_line(command, 143, "greencode: interrupted by SIGTERM; [policy] ")
    assert line == (f"greencode: interrupted by SIGTERM; [policy] train-policy kept its checkpoint after update "
                    f"{saved[-1]} of 120 in {policy_dir / 'policy.partial'}; the same command resumes at update "
                    f"{saved[-1] + 1}"), line
    assert not leftovers(tmp_path)

    again = run(["run", path], env, tmp_path / "again", cwd=tmp_path)
    assert again.proc.returncode == 0, again.stderr()
    assert "[rollouts] up to date" in again.stdout() and f"resuming after update {saved[-1]}" in again.stdout()
    assert (tmp_path / "runs" / "chain" / "evaluate" / "summary.json").is_file() and not partial.exists()


def test_ppo_that_diverges_stops_at_the_first_non_finite_value_and_saves_nothing(store, tmp_path):
    small = dict(num_envs=16, num_steps=32, minibatch_size=128, hidden=(16, 16), checkpoint_every=2,
                 total_timesteps=16 * 32 * 4)
    out = tmp_path / "policy"
    # Adam's steps are about the learning rate: 1e20 overflows the value head at once (1e3 stays finite)
    with pytest.raises(gc.GreencodeError) as error:
        train_policy(store, out, RLSection(**small, learning_rate=1e20), progress=False, log=lambda *a: None)
    message = str(error.value)
    assert "\n" not in message and re.search(r"is (nan|inf|-inf) at update 1 of 4; lower rl\.learning_rate \(1e\+20\)",
                                             message), message
    assert "rl.beta" in message and "rl.energy_weight" in message and "nothing saved" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no policy, no policy.partial, no lock
    # other settings into the same place are not refused as "an interrupted training with other settings"
    train_policy(store, out, RLSection(**small, learning_rate=3e-3), progress=False, log=lambda *a: None)
    assert (out / "actor.safetensors").is_file()


def test_safe_points_take_a_signal_at_the_next_check_and_a_second_ctrl_c_at_once():
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.reset()
    with pytest.raises(Interrupted) as stopped:
        with SafePoints() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            stop.check(lambda: "kept 3 things")  # the handler has run by now: only a flag was set
    assert stop.received == "SIGTERM" and interrupts.received() == "SIGTERM"
    assert str(stopped.value) == "interrupted by SIGTERM; kept 3 things" and stopped.value.exit_status == 143
    assert stopped.value.at_safe_point
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous  # restored

    with pytest.raises(KeyboardInterrupt) as at_once:
        with SafePoints() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            with stop.critical():  # a checkpoint save: even the second Ctrl-C waits
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
            assert stop.received == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # not reached: the second Ctrl-C outside a save interrupts at once
    assert not isinstance(at_once.value, Interrupted)
    with pytest.raises(Interrupted, match="interrupted by SIGINT; after the last check"):
        with SafePoints() as stop:  # a signal after the last check is raised when the block ends
            stop.check("after the last check")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    interrupts.reset()


def test_an_interrupt_python_drops_inside_a_finaliser_is_delivered_again():
    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside __del__, where Python drops its exception

    interrupts.reset()
    previous = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            Finaliser()
            time.sleep(5)  # cut short by the signal delivered again
        assert interrupts.received() == "SIGTERM" and interrupts.interrupted().exit_status == 143
    finally:
        interrupts.restore(previous)
        interrupts.reset()
