"""PPO: GAE and the loss against NumPy, learning a learnable rule, one device vs eight, exact resume."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import greencode_jax as gc
from greencode_jax.interrupts import Interrupted
from greencode_jax.rl import ppo
from greencode_jax.config import RLSection
from greencode_jax.rl.train import train_policy

sys.path.insert(0, str(Path(__file__).parent))
from rl_helpers import synthetic_arrays, write_synthetic_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A small run that learns the synthetic rule in a few seconds.
SMALL = dict(num_envs=16, num_steps=32, minibatch_size=128, hidden=(16, 16), learning_rate=3e-3, checkpoint_every=4)


def test_gae_matches_a_numpy_recomputation():
    rng = np.random.default_rng(0)
    t, n, gamma, lam = 7, 3, 0.9, 0.8
    rewards, values = rng.normal(size=(t, n)), rng.normal(size=(t, n))
    dones, last = rng.random((t, n)) < 0.3, rng.normal(size=n)
    got = np.asarray(ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(dones), jnp.asarray(last),
                             gamma, lam))
    expected = np.zeros((t, n))
    advantage = np.zeros(n)
    nxt = last
    for i in reversed(range(t)):
        delta = rewards[i] + gamma * (1 - dones[i]) * nxt - values[i]
        advantage = delta + gamma * lam * (1 - dones[i]) * advantage
        expected[i], nxt = advantage, values[i]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _numpy_mlp(layers, x):
    for layer in layers[:-1]:
        x = np.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def test_ppo_loss_matches_a_numpy_recomputation():
    cfg = RLSection(**SMALL, entropy_coef=0.01)
    rng = np.random.default_rng(1)
    from greencode_jax.rl.networks import init_actor_critic

    params = init_actor_critic(jax.random.PRNGKey(0), 5, (8,))
    m = 64
    obs = rng.normal(size=(m, 5)).astype(np.float32)
    action = rng.integers(0, 2, m)
    old = np.log(rng.uniform(0.2, 0.8, m)).astype(np.float32)
    adv, targets = rng.normal(size=m).astype(np.float32), rng.normal(size=m).astype(np.float32)
    mean, std = np.full(5, 0.1, np.float32), np.full(5, 2.0, np.float32)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    loss = jax.shard_map(lambda p, b: ppo.ppo_loss(p, b, mean, std, cfg, "data"), mesh=mesh,
                         in_specs=(P(), P()), out_specs=P(), check_vma=False)
    total, (pg, vl, ent) = loss(params, (obs, action, old, adv, targets))
    np_params = jax.tree.map(np.asarray, params)
    x = (obs - mean) / std
    logits = _numpy_mlp(np_params["actor"], x)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ratio = np.exp(logp[np.arange(m), action] - old)
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    expected_pg = -np.mean(np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a))
    expected_vl = np.mean((targets - _numpy_mlp(np_params["critic"], x)[:, 0]) ** 2)
    expected_ent = -np.mean((np.exp(logp) * logp).sum(-1))
    np.testing.assert_allclose([pg, vl, ent], [expected_pg, expected_vl, expected_ent], rtol=1e-4)
    assert float(total) == pytest.approx(expected_pg + 0.5 * expected_vl - 0.01 * expected_ent, rel=1e-4)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_stores")
    return (write_synthetic_store(root / "train", synthetic_arrays()),
            write_synthetic_store(root / "val", synthetic_arrays(episodes=64, seed=1)))


def test_ppo_learns_a_rule_of_the_observation_and_the_policy_loads_for_generation(stores, tmp_path):
    train, val = stores
    cfg = RLSection(**{**SMALL, "checkpoint_every": 16}, total_timesteps=16 * 32 * 96)
    result = train_policy(train, tmp_path / "policy", cfg, validation_dir=val, progress=False, log=lambda *a: None)
    rows = {row["threshold"]: row for row in result["validation"]["learned"]}
    assert rows[0.5]["exit_accuracy"] >= 0.95  # decisions ending at l* on held-out episodes
    policy = gc.policies.Learned.load(tmp_path / "policy", threshold=0.5)
    assert policy.exit_layers == (1, 3, 5, 7)
    info = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert info["reward"] == "greencode" and info["result"]["updates"] == 96
    lines = (tmp_path / "policy" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 96 and {"episode_reward", "exit_accuracy", "entropy", "value_loss"} <= json.loads(lines[0]).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no .partial left


def test_an_interrupted_training_resumes_bit_identically(stores, tmp_path, monkeypatch):
    train, _ = stores
    cfg = RLSection(**SMALL, total_timesteps=16 * 32 * 12)
    train_policy(train, tmp_path / "whole", cfg, progress=False, log=lambda *a: None)
    calls = {"n": 0}
    block = ppo.Trainer.block

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first block was checkpointed: what Ctrl-C does
            raise KeyboardInterrupt
        return block(self, *args)

    monkeypatch.setattr(ppo.Trainer, "block", interrupted)
    with pytest.raises(Interrupted, match="kept its checkpoint after update 4 of 12 .* resumes at update 5"):
        train_policy(train, tmp_path / "resumed", cfg, progress=False, log=lambda *a: None)
    assert (tmp_path / "resumed.partial").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(ppo.Trainer, "block", block)
    with (tmp_path / "resumed.partial" / "metrics.jsonl").open("a") as f:  # a block whose save was cut short
        f.write(json.dumps({"update": 5, "seed": 0, "episode_reward": 1e9}) + "\n")
    train_policy(train, tmp_path / "resumed", cfg, progress=False, log=lambda *a: None)
    for name in ("actor.safetensors", "metrics.jsonl"):
        a, b = (tmp_path / "whole" / name).read_bytes(), (tmp_path / "resumed" / name).read_bytes()
        if name == "metrics.jsonl":  # timesteps/s differ between runs; every learned number must not
            strip = lambda text: [{k: v for k, v in json.loads(l).items() if k != "timesteps_per_s"}  # noqa: E731
                                  for l in text.decode().splitlines()]
            assert strip(a) == strip(b)
        else:
            assert a == b


def test_metrics_of_a_first_block_never_checkpointed_are_not_kept_twice(stores, tmp_path, monkeypatch):
    """A crash after the first block's metrics were written and before its checkpoint: the rerun starts
    from update 0 again and its metrics.jsonl holds each update once."""
    train, _ = stores
    cfg = RLSection(**SMALL, total_timesteps=16 * 32 * 4)
    block = ppo.Trainer.block

    def stopped(self, *args):
        raise KeyboardInterrupt  # before any block: nothing checkpointed

    monkeypatch.setattr(ppo.Trainer, "block", stopped)
    with pytest.raises(Interrupted):
        train_policy(train, tmp_path / "policy", cfg, progress=False, log=lambda *a: None)
    monkeypatch.setattr(ppo.Trainer, "block", block)
    with (tmp_path / "policy.partial" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"update": 1, "seed": 0, "episode_reward": 1e9}) + "\n")
    train_policy(train, tmp_path / "policy", cfg, progress=False, log=lambda *a: None)
    updates = [json.loads(line)["update"] for line in (tmp_path / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert updates == [1, 2, 3, 4]


def test_a_training_stopped_after_its_last_update_resumes_and_writes_the_policy(stores, tmp_path):
    """Every update trained and checkpointed, then validation failed (its store cut short): the same call
    again trains nothing and writes the policy, with the final metrics an uninterrupted run reports."""
    import shutil

    train, val = stores
    cfg = RLSection(**SMALL, total_timesteps=16 * 32 * 4)
    whole = train_policy(train, tmp_path / "whole", cfg, validation_dir=val, progress=False, log=lambda *a: None)
    cut = shutil.copytree(val, tmp_path / "val")
    confidence = cut / "chunks" / "00000" / "confidence.npy"
    intact = confidence.read_bytes()
    confidence.write_bytes(intact[:200])  # read only when choosing the seed, after training
    with pytest.raises(gc.GreencodeError, match="confidence.npy: unreadable"):
        train_policy(train, tmp_path / "resumed", cfg, validation_dir=cut, progress=False, log=lambda *a: None)
    assert (tmp_path / "resumed.partial").is_dir() and not (tmp_path / "resumed").exists()
    confidence.write_bytes(intact)
    resumed = train_policy(train, tmp_path / "resumed", cfg, validation_dir=cut, progress=False, log=lambda *a: None)
    assert resumed["final_metrics"] == whole["final_metrics"] and resumed["final_metrics"]
    assert (tmp_path / "resumed" / "actor.safetensors").read_bytes() == \
        (tmp_path / "whole" / "actor.safetensors").read_bytes()


def test_bad_input_is_one_clear_error_and_writes_nothing(stores, tmp_path):
    train, _ = stores
    cfg = RLSection(**SMALL, total_timesteps=16 * 32)
    cases = [(tmp_path / "absent", cfg, None, "no such rollouts directory"),
             (tmp_path, cfg, None, "not a rollouts directory"),
             (train, RLSection(**SMALL, total_timesteps=16 * 32, reward="energy"), None, "needs a cost model")]
    other = write_synthetic_store(tmp_path / "other", synthetic_arrays(episodes=8), exit_layers=(2, 4, 7))
    cases.append((train, cfg, other, "recorded from a model with exit_layers"))
    for rollouts, c, validation, message in cases:
        with pytest.raises(gc.GreencodeError, match=message):
            train_policy(rollouts, tmp_path / "out", c, validation_dir=validation, progress=False)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_eight_devices_train_the_same_parameters_as_one():
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import jax, numpy as np
        from rl_helpers import synthetic_arrays
        from greencode_jax.rl import env as E
        from greencode_jax.config import RLSection
        from greencode_jax.rl.ppo import Trainer
        a = synthetic_arrays(episodes=64)
        env = E.make_env(a["hidden"], a["agree"], [1, 3, 5, 7], {{}})
        cfg = RLSection(num_envs=16, num_steps=32, minibatch_size=128, hidden=(16, 16), learning_rate=3e-3,
                        checkpoint_every=3, total_timesteps=16 * 32 * 3, seeds=2)
        out = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
            t = Trainer(cfg, 8, np.zeros(8), np.ones(8), mesh)
            state, metrics = t.block(t.init(env, [0, 1]), env, 3)
            out.append(jax.tree.map(np.asarray, (state.params, metrics)))
        (p1, m1), (p8, m8) = out
        # Eight devices sum each gradient in another order (a psum of per-device means): float32
        # rounding, ~1e-7 relative per update, which three Adam updates of lr 3e-3 keep below 1e-5.
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        same = all(np.allclose(m1[k], m8[k], rtol=1e-4, atol=1e-5) for k in m1)
        print("DIFF", diff, "METRICS_SAME", same, "DEVICES", jax.device_count())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("DIFF")][0].split()
    assert line[5] == "8" and line[3] == "True", proc.stdout
    assert float(line[1]) < 1e-5, proc.stdout
