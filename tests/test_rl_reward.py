"""GREEN-CODE's reward against a hand-computed table, the oracle's return, the environment's steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from greencode_jax.rl import env as E
from greencode_jax.rl.validate import deterministic_return

LAYERS = [1, 3, 5, 7]  # decision exits 1, 3, 5; the last layer 7 = L_max


def test_reward_table_by_hand_hits_every_branch():
    # One token: exits 1 and 5 agree with the final layer, 3 does not: l* = 1.
    agree = np.array([[True, False, True]])
    r = E.reward_table(agree, LAYERS, alpha=2.0, beta=3.0, gamma_r=0.5, epsilon=0.1)[0]
    scale = 0.5 * 7  # gamma_r * L_max divides every negative reward
    assert r[0, E.EXIT] == pytest.approx(1.0)  # exit at l*: +1, unscaled
    assert r[1, E.EXIT] == pytest.approx(-0.1 / scale)  # late and wrong: -epsilon
    assert r[2, E.EXIT] == pytest.approx(-2.0 * (5 - 1) / scale)  # late but agreeing: -alpha (l - l*)
    assert r[0, E.CONTINUE] == pytest.approx(-0.5 * (3 - 1) / scale)  # continue at/after l*: -gamma (next - l*)
    assert r[2, E.CONTINUE] == pytest.approx(-0.5 * (7 - 1) / scale)  # the last decision: next is the last layer
    # A token whose first agreeing exit is 5: l* = 5.
    agree = np.array([[False, False, True]])
    r = E.reward_table(agree, LAYERS, alpha=2.0, beta=3.0, gamma_r=0.5, epsilon=0.1)[0]
    assert r[0, E.EXIT] == pytest.approx(-3.0 * (5 - 1) / scale)  # early and wrong: -beta (l* - l)
    assert r[1, E.EXIT] == pytest.approx(-3.0 * (5 - 3) / scale)
    assert r[0, E.CONTINUE] == pytest.approx(1.0) and r[1, E.CONTINUE] == pytest.approx(1.0)  # before l*: +1
    assert r[2, E.EXIT] == pytest.approx(1.0)
    # No decision exit agrees: l* = 7, the last layer; running through is right.
    r = E.reward_table(np.array([[False, False, False]]), LAYERS)[0]
    assert np.allclose(r[:, E.CONTINUE], 1.0)
    assert r[2, E.EXIT] == pytest.approx(-1.0 * (7 - 5) / 7)


def test_energy_reward_with_the_greencode_price_equals_the_greencode_reward_and_scales_otherwise():
    agree = np.random.default_rng(0).random((20, 15, 3)) < 0.5
    a, b = 0.004, 0.0006
    joules = a + b * (np.arange(8) + 1)
    greencode = E.reward_table(agree, LAYERS)
    assert np.allclose(E.reward_table(agree, LAYERS, cost=joules / b), greencode, atol=1e-6)
    doubled = E.reward_table(agree, LAYERS, cost=2 * joules / b)
    negative = greencode < 0
    # Depth terms double; -epsilon (no depth term) and the +1s stay.
    eps = np.isclose(greencode, -0.1 / 7)
    assert np.allclose(doubled[negative & ~eps], 2 * greencode[negative & ~eps], atol=1e-6)
    assert np.allclose(doubled[~negative | eps], greencode[~negative | eps])


def _all_deterministic_policies(x):
    """Every choice of exit index per token, as P(exit) arrays: exit at k (or run through, k = x)."""
    for k in range(x + 1):
        p = np.zeros(x)
        if k < x:
            p[k] = 1.0
        yield k, p


def test_the_oracle_earns_the_maximum_return():
    rng = np.random.default_rng(1)
    agree = rng.random((30, 15, 3)) < 0.4
    rewards = E.reward_table(agree, LAYERS)
    lstar_index = np.argmax(np.concatenate([agree, np.ones((30, 15, 1), bool)], -1), -1)
    oracle = (np.arange(3) == lstar_index[..., None]).astype(float)
    best = deterministic_return(oracle, rewards)
    # Per token, the reward of each choice k (continue k times, then exit; k = 3: run through).
    per_choice = np.stack([rewards[..., :k, 0].sum(-1) + (rewards[..., k, 1] if k < 3 else 0) for k in range(4)], -1)
    assert np.all(np.take_along_axis(per_choice, lstar_index[..., None], -1)[..., 0] >= per_choice.max(-1) - 1e-9)
    assert best == pytest.approx(per_choice.max(-1).sum(-1).mean(), rel=1e-6)
    for k, p in _all_deterministic_policies(3):
        assert deterministic_return(np.broadcast_to(p, agree.shape), rewards) <= best + 1e-9


def test_stepping_the_environment_follows_the_table_and_ends_tokens_and_episodes():
    rng = np.random.default_rng(2)
    agree = rng.random((4, 2, 3)) < 0.5
    hidden = rng.normal(size=(4, 2, 3, 5)).astype(np.float32)
    env = E.make_env(hidden, agree, LAYERS, {})
    table = E.reward_table(agree, LAYERS)
    state = E.EnvState(jnp.int32(2), jnp.int32(0), jnp.int32(0), jnp.float32(0))
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(E.observe(env, state), hidden[2, 0, 0])
    state, r, done, info = E.step(env, state, E.CONTINUE, key)  # token 0: to decision 1
    assert float(r) == pytest.approx(table[2, 0, 0, 0]) and not bool(info.token_done)
    assert (int(state.token), int(state.decision)) == (0, 1)
    state, r, done, info = E.step(env, state, E.EXIT, key)  # exit at layer 3: token 1
    assert float(r) == pytest.approx(table[2, 0, 1, 1]) and bool(info.token_done) and int(info.exit_layer) == 3
    assert (int(state.token), int(state.decision)) == (1, 0) and not bool(done)
    ret = float(state.episode_return)
    for d in range(3):  # token 1 runs through every decision to the last layer: the episode ends
        state, r, done, info = E.step(env, state, E.CONTINUE, key)
        ret += float(r)
    assert bool(done) and bool(info.token_done) and int(info.exit_layer) == 7
    assert float(info.episode_return) == pytest.approx(ret, rel=1e-6)
    assert (int(state.token), int(state.decision), float(state.episode_return)) == (0, 0, 0.0)  # a fresh episode
