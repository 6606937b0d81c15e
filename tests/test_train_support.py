"""Shared helpers of the train and parallel tests (no tests here).

A small real corpus (the first 120 files of this Python's standard library, byte-level
BPE of 512 tokens) is prepared once per session; runs of `greencode finetune` happen in
subprocesses that share one persistent JAX compilation cache, so each shape compiles once
per session (the first run pays it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": True}


def tiny_config(corpus: Path, out_dir: Path, name: str, **overrides) -> dict:
    """A tiny from-scratch run on the session corpus; `section={field: value}` overrides."""
    config = {
        "run": {"name": name, "out_dir": str(out_dir), "seed": 0, "log_every": 1, "progress": False},
        "model": {"init": "scratch", "exit_layers": [0], "config": dict(TINY_LLAMA)},
        "data": {"path": str(corpus), "seq_len": 32},
        "train": {"steps": 8, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 2, "clip_norm": 1.0},
        "checkpoint": {"every": 4, "keep": 2},
        "eval": {"batches": 2},
    }
    for section, fields in overrides.items():
        config.setdefault(section, {}).update(fields)
    return config


def chain_config(corpus: Path, cost: Path, policies: str = "full; fixed:0; confidence:softmax_max@0.5; learned@0.5,1.0",
                 samples: int = 3, timesteps: int = 256) -> dict:
    """The whole pipeline (`greencode run`) at the smallest shapes that run every stage, on TINY_LLAMA
    from scratch, with the cost model `cost` (written by `write_chain_cost`) instead of a calibration:
    calibrating a model this small measures noise (the calibration has tests of its own)."""
    return {
        "run": {"name": "chain", "out_dir": "runs", "seed": 0, "log_every": 1, "progress": False},
        "model": {"init": "scratch", "exit_layers": [0], "config": dict(TINY_LLAMA)},
        "data": {"path": str(corpus), "seq_len": 32},
        "train": {"steps": 4, "batch_size": 8, "learning_rate": 3e-3},
        "checkpoint": {"every": 4, "keep": 1},
        "eval": {"batches": 1, "samples": samples, "max_context": 48, "pad_prompts": 64, "policies": policies,
                 "protocols": ["completion"]},
        "energy": {"cost_model": str(cost)},
        "rollouts": {"episodes": 8, "validation_episodes": 4, "batch_size": 4, "max_context": 40},
        "rl": {"num_envs": 8, "num_steps": 16, "minibatch_size": 64, "total_timesteps": timesteps, "hidden": [8, 8],
               "checkpoint_every": 2},
        # a delta this loose certifies with the dozen dev documents of the corpus (n >= 7 at epsilon 0.1)
        "certify": {"delta": 0.3, "batch_size": 4},
    }


def write_chain_cost(corpus: Path, cost: Path) -> Path:
    """A hand-made cost model for TINY_LLAMA on `corpus`'s vocabulary (what energy calibrate records)."""
    import json

    vocab = json.loads((corpus / "prepare.json").read_text())["tokenizer"]["vocab_size"]
    architecture = {"family": "llama", "num_layers": 2, "hidden_size": 32, "vocab_size": vocab, "num_heads": 4,
                    "num_kv_heads": 2, "intermediate_size": 64, "head_dim": 8}  # TINY_LLAMA's
    cost.write_text(json.dumps({"a_j": 0.01, "b_j_per_layer": 0.002, "method": "estimated", "num_layers": 2,
                                "architecture": architecture}))
    return cost


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli_module() -> str:
    """The real `greencode` entry point once it registers finetune; train_cmd's own until then."""
    from greencode_jax.cli.main import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    return "greencode_jax.cli.main" if "finetune" in choices else "greencode_jax.cli.train_cmd"


CLI_MODULE = _cli_module()


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, *map(str, args)]


def run_cli(args, env, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def subprocess_env(cache_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENCODE_", "SLURM_"))}
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


_SESSION: dict = {}  # fixtures imported into several test modules are distinct pytest fixtures: share results here


def _once(name: str, build):
    if name not in _SESSION:
        _SESSION[name] = build()
    return _SESSION[name]


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    return _once("corpus", lambda: _prepare_corpus(tmp_path_factory))


def _prepare_corpus(tmp_path_factory) -> Path:
    from greencode_jax.data import PrepareOptions, prepare_data

    out = tmp_path_factory.mktemp("train_corpus") / "stdlib"
    prepare_data(PrepareOptions(lang="python", out=str(out), max_files=120, vocab_size=512, line_samples=0,
                                workers=1, progress=False))
    return out


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return _once("cache", lambda: tmp_path_factory.mktemp("jax_compile_cache"))


def restore_train_state(checkpoint_dir: Path, step: int) -> dict:
    """The raw train state (host arrays) saved at `step` by `greencode finetune`."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(checkpoint_dir).absolute(), item_names=("state", "meta")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]


def flat_leaves(tree) -> dict:
    import jax
    import numpy as np

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def model_params(model) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


FINISHED_STEPS = 80


@pytest.fixture(scope="session")
def finished_tiny_run(stdlib_corpus, compile_cache, tmp_path_factory) -> Path:
    """A finished 80-step `greencode finetune` run of the tiny model on the stdlib corpus (its run dir)."""
    return _once("finished", lambda: _finished_run(stdlib_corpus, compile_cache, tmp_path_factory))


def _finished_run(stdlib_corpus, compile_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished_run")
    config = tiny_config(stdlib_corpus, out, "tiny", train={"steps": FINISHED_STEPS},
                         checkpoint={"every": 25, "keep": 2}, eval={"batches": 4})
    done = run_cli(["finetune", write_config(out / "tiny.yaml", config)], subprocess_env(compile_cache))
    assert done.returncode == 0, done.stderr
    return out / "tiny"


EQUIVALENCE_STEPS = 6


def equivalence_config(corpus: Path, out_dir: Path, name: str, **overrides) -> dict:
    """The tiny run used to compare layouts (devices, processes). adam_eps = 1 makes Adam's update
    ~ lr * m / (sqrt(v) + 1), linear in the gradient: fp32 reduction-order differences then move
    weights by ~lr * 1e-7, instead of Adam's default turning a rounding-level gradient element
    into a full +-lr step (its g / (|g| + 1e-8) is a sign function), which would compare how a
    different summation order rounds, not whether the sharded program computes the same thing."""
    settings = dict(train={"steps": EQUIVALENCE_STEPS, "adam_eps": 1.0, "learning_rate": 0.05},
                    checkpoint={"every": EQUIVALENCE_STEPS})
    for section, fields in overrides.items():
        settings.setdefault(section, {}).update(fields)
    return tiny_config(corpus, out_dir, name, **settings)


@pytest.fixture(scope="session")
def one_device_run(stdlib_corpus, compile_cache, tmp_path_factory) -> Path:
    """The equivalence run in one process on one CPU device (its run dir)."""
    return _once("one_device", lambda: _one_device_run(stdlib_corpus, compile_cache, tmp_path_factory))


def _one_device_run(stdlib_corpus, compile_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_device")
    path = write_config(out / "one.yaml", equivalence_config(stdlib_corpus, out, "one"))
    done = run_cli(["finetune", path], subprocess_env(compile_cache))
    assert done.returncode == 0, done.stderr
    assert "on 1 device(s)" in done.stdout
    return out / "one"


def assert_equivalent_runs(reference: Path, other: Path):
    """Same losses at every step and the same final weights, to fp32 reduction-order rounding."""
    import numpy as np

    import greencode_jax as gc
    from greencode_jax.metrics_log import read_metrics

    ref = [r for r in read_metrics(reference / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(other / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, EQUIVALENCE_STEPS + 1))
    for a, b in zip(ref, got):
        # a loss is a mean over 248 predictions x exits: fp32 sums in another order differ by ~1e-7 relative
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(list(b["exit_loss"].values()), list(a["exit_loss"].values()), rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    start = flat_leaves(model_params(gc.load_pretrained(reference / "final")))
    theirs = flat_leaves(model_params(gc.load_pretrained(other / "final")))
    for key, value in start.items():
        # weights of std 0.02..1 moved by 6 steps of ~lr*g: the difference is fp32 rounding (~1e-7)
        np.testing.assert_allclose(theirs[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
