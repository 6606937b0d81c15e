"""The exit environment of rl.env as a `gymnasium.Env`, for Stable-Baselines3 (`bench rl`).

The same environment, not a re-derivation: the reward is rl.env.reward_table's, l* is
rl.env.first_agreeing's index, and a step makes the transition of rl.env.step (an exit, or
continuing at the last decision exit, ends the token; the last token ends the episode).
Every step is a NumPy lookup into the cached arrays.

Observations are normalised with the store's statistics, (h - obs_mean) / obs_std in
float32, because our actor normalises inside its network (rl.networks.actor_logits): an
MLP fed these observations computes the same function class as ours. `normalise=False`
returns the raw state, as rl.env.observe does.

Episodes: drawn uniformly (the env's own `np_random`, seeded by `reset(seed=...)`), or
taken in order from an explicit `episodes` sequence, so a run can replay the draws of the
JAX environment exactly. The observation returned with `terminated=True` is zeros: no
hidden state follows the last token, and nothing acts on it (no episode is truncated).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from greencode_jax.errors import GreencodeError
from greencode_jax.rl.env import CONTINUE, EXIT, reward_table

__all__ = ["CONTINUE", "EXIT", "ExitEnv"]


class ExitEnv(gym.Env):
    """hidden [N, T, X, E] (NumPy, may be memory-mapped), agree [N, T, X] bool, layers = the
    decision exits then the last layer, reward_kwargs as rl.env.make_env takes them.

    `info` of a step: token_done, exit_layer, correct (the token ended at l*), episode,
    and at the end of an episode episode_return (as rl.env.StepInfo).
    """

    metadata = {"render_modes": []}

    def __init__(self, hidden, agree, layers, reward_kwargs: dict | None = None, obs_mean=None, obs_std=None, *,
                 episodes=None, normalise: bool = True):
        hidden, agree = np.asarray(hidden), np.asarray(agree, bool)
        if hidden.ndim != 4 or agree.shape != hidden.shape[:3]:
            raise GreencodeError(f"ExitEnv: expected hidden [N, T, X, E] and agree [N, T, X], got "
                                 f"{list(hidden.shape)} and {list(agree.shape)}")
        if len(layers) != hidden.shape[2] + 1:
            raise GreencodeError(f"ExitEnv: {len(layers)} layers for {hidden.shape[2]} decision exits; expected the "
                                 "decision exits then the last layer")
        size = hidden.shape[-1]
        self.hidden = hidden
        self.rewards = reward_table(agree, layers, **(reward_kwargs or {}))  # [N, T, X, 2] float32
        full = np.concatenate([agree, np.ones(agree.shape[:-1] + (1,), bool)], axis=-1)
        self.lstar_index = np.argmax(full, axis=-1)  # as rl.env.make_env: 0..X, X = only the last layer agrees
        self.layers = np.asarray(layers, np.int64)
        self.normalise_obs = normalise
        self.obs_mean = np.zeros(size, np.float32) if obs_mean is None else np.asarray(obs_mean, np.float32)
        self.obs_std = np.ones(size, np.float32) if obs_std is None else np.asarray(obs_std, np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._sequence = None if episodes is None else iter([int(e) for e in episodes])
        self.episode = self.token = self.decision = 0
        self.episode_return = np.float32(0)

    def normalise(self, obs):
        """Raw hidden states [..., E] -> what this env observes (the actor's normalisation)."""
        obs = np.asarray(obs, np.float32)
        return (obs - self.obs_mean) / self.obs_std if self.normalise_obs else obs

    def _obs(self):
        return self.normalise(self.hidden[self.episode, self.token, self.decision])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        n = self.hidden.shape[0]
        if options and "episode" in options:
            episode = int(options["episode"])
        elif self._sequence is not None:
            episode = next(self._sequence, None)
            if episode is None:
                raise GreencodeError("ExitEnv: the explicit episode sequence is exhausted")
        else:
            episode = int(self.np_random.integers(n))
        if not 0 <= episode < n:
            raise GreencodeError(f"ExitEnv: episode {episode} outside 0..{n - 1}")
        self.episode, self.token, self.decision = episode, 0, 0
        self.episode_return = np.float32(0)
        return self._obs(), {"episode_index": episode}

    def step(self, action):
        action = int(action)
        if action not in (CONTINUE, EXIT):
            raise GreencodeError(f"ExitEnv: action {action!r}; expected 0 (continue) or 1 (exit)")
        tokens, decisions = self.hidden.shape[1], self.hidden.shape[2]
        reward = self.rewards[self.episode, self.token, self.decision, action]
        self.episode_return = np.float32(self.episode_return + reward)  # float32 sums, as the JAX env's
        token_done = action == EXIT or self.decision == decisions - 1
        exit_index = self.decision if action == EXIT else decisions
        info = {"token_done": token_done, "exit_layer": int(self.layers[exit_index]),
                "correct": bool(exit_index == self.lstar_index[self.episode, self.token]), "episode_index": self.episode}  # not "episode": SB3 reads that key as Monitor statistics
        if token_done:
            self.token, self.decision = self.token + 1, 0
        else:
            self.decision += 1
        terminated = token_done and self.token == tokens
        if terminated:
            info["episode_return"] = float(self.episode_return)
            obs = np.zeros(self.observation_space.shape, np.float32)
        else:
            obs = self._obs()
        return obs, float(reward), terminated, False, info
