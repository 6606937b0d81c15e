"""The gymnasium wrapper (stable-baselines3's side of `bench rl`) is the same environment as rl.env."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from greencode_jax.rl import env as E
from greencode_jax.rl.gym_env import ExitEnv

sys.path.insert(0, str(Path(__file__).parent))
from rl_helpers import synthetic_arrays  # noqa: E402

LAYERS = [1, 3, 5, 7]


def test_the_wrapper_and_the_jax_environment_agree_step_for_step():
    a = synthetic_arrays(episodes=12, tokens=4, hidden=6)
    mean, std = a["hidden"].reshape(-1, 6).mean(0), a["hidden"].reshape(-1, 6).std(0)
    kwargs = dict(alpha=2.0, beta=3.0, epsilon=0.2)
    env = E.make_env(a["hidden"], a["agree"], LAYERS, kwargs)
    gym_env = ExitEnv(a["hidden"], a["agree"], LAYERS, kwargs, mean, std)
    step = jax.jit(E.step)
    key = jax.random.PRNGKey(0)
    state = E.reset(env, key)
    obs, _ = gym_env.reset(options={"episode": int(state.episode)})
    rng = np.random.default_rng(0)
    episodes = 0
    for _ in range(300):
        # The JAX env observes raw states (the actor normalises them); the wrapper hands SB3 the normalised ones.
        np.testing.assert_allclose(obs, (np.asarray(E.observe(env, state)) - mean) / std, rtol=1e-6, atol=1e-6)
        action = int(rng.integers(2))
        key, k = jax.random.split(key)
        state, reward, done, info = step(env, state, jnp.int32(action), k)
        obs, g_reward, terminated, truncated, g_info = gym_env.step(action)
        assert g_reward == pytest.approx(float(reward), abs=1e-7) and terminated == bool(done) and not truncated
        assert g_info["token_done"] == bool(info.token_done) and g_info["correct"] == bool(info.correct)
        if g_info["token_done"]:
            assert g_info["exit_layer"] == int(info.exit_layer)
        if terminated:
            assert g_info["episode_return"] == pytest.approx(float(info.episode_return), rel=1e-6)
            episodes += 1
            obs, _ = gym_env.reset(options={"episode": int(state.episode)})  # the JAX env's fresh draw
    assert episodes >= 10


def test_the_wrapper_passes_gymnasiums_checker():
    from gymnasium.utils.env_checker import check_env

    a = synthetic_arrays(episodes=4, tokens=3, hidden=5)
    check_env(ExitEnv(a["hidden"], a["agree"], LAYERS), skip_render_check=True)
