"""GREEN-CODE's exit environment as a pure-JAX replay of a rollout store.

State: (episode, token, decision index). The observation is the cached hidden state after
the decision exit (raw: the actor normalises it with the store's statistics, exactly as
`Learned` does at inference). Action 1 exits, 0 continues; an exit, or continuing at the
last decision exit (the token then runs to the last layer), ends the token; the store's
token count ends the episode, and the next one starts from a uniformly drawn episode.

Every reward depends only on (episode, token, decision, action), so `make_env` computes
the whole table once and a step is a lookup: `reset` and `step` are functional and vmap
over any number of environments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.errors import GreencodeError

CONTINUE, EXIT = 0, 1


def first_agreeing(agree: np.ndarray, layers) -> np.ndarray:
    """l*: per token, the first exit layer (of `layers`, the decision exits then the last layer)
    whose argmax equals the final layer's. agree [..., X] over the decision exits."""
    layers = np.asarray(layers)
    full = np.concatenate([agree, np.ones(agree.shape[:-1] + (1,), bool)], axis=-1)
    return layers[np.argmax(full, axis=-1)]


def reward_table(agree: np.ndarray, layers, *, alpha=1.0, beta=1.0, gamma_r=1.0, epsilon=0.1,
                 cost=None) -> np.ndarray:
    """GREEN-CODE's reward for every (…, decision x, action) as float32 [..., X, 2].

    `layers` = the decision exits then the last layer (its L_max). With l the decision layer,
    l* the first agreeing exit layer, next(l) the following exit layer:
      exit:     +1 if l == l* (l is the first exit at or after l*);
                else -alpha d(l, l*) if l still agrees (late); else -beta d(l*, l) if l < l* (early);
                else -epsilon (late and wrong);
      continue: +1 if l < l*; else -gamma_r d(next(l), l*).
    Negative rewards are divided by gamma_r * L_max (GREEN-CODE's scaling); +1 is not.
    d(a, b) = a - b in layers for the `greencode` reward; for the `energy` reward `cost` [num
    layers] gives joules per token when exiting at each layer (times the price) and
    d(a, b) = cost[a] - cost[b].
    """
    layers = np.asarray(layers)
    decisions, last = layers[:-1], int(layers[-1])
    if last <= 0:
        raise GreencodeError("reward: the last exit layer must be above layer 0")
    lstar = first_agreeing(agree, layers)[..., None]  # [..., 1]
    depth = (lambda layer: layer.astype(np.float64)) if cost is None else (lambda layer: np.asarray(cost)[layer])
    l = np.broadcast_to(decisions, agree.shape)
    nxt = np.broadcast_to(layers[1:], agree.shape)
    scale = gamma_r * last
    exit_r = np.where(l == lstar, 1.0,
                      np.where(agree, -alpha * (depth(l) - depth(lstar)),
                               np.where(l < lstar, -beta * (depth(lstar) - depth(l)), -epsilon)))
    cont_r = np.where(l < lstar, 1.0, -gamma_r * (depth(nxt) - depth(lstar)))
    exit_r = np.where(exit_r < 0, exit_r / scale, exit_r)
    cont_r = np.where(cont_r < 0, cont_r / scale, cont_r)
    return np.stack([cont_r, exit_r], axis=-1).astype(np.float32)


class EnvArrays(NamedTuple):
    """The store on the device: hidden [N, T, X, E], rewards [N, T, X, 2], l* index [N, T]
    (0..X; X = no decision exit agrees), layers [X + 1]."""

    hidden: jax.Array
    rewards: jax.Array
    lstar_index: jax.Array
    layers: jax.Array


class EnvState(NamedTuple):
    episode: jax.Array
    token: jax.Array
    decision: jax.Array
    episode_return: jax.Array


class StepInfo(NamedTuple):
    token_done: jax.Array  # bool: this step ended a token
    exit_layer: jax.Array  # the layer the token ended at (valid where token_done)
    correct: jax.Array  # bool: it ended at l* (valid where token_done)
    episode_done: jax.Array
    episode_return: jax.Array  # the finished episode's return (valid where episode_done)


def make_env(hidden, agree, layers, reward_kwargs: dict) -> EnvArrays:
    agree = np.asarray(agree, bool)
    table = reward_table(agree, layers, **reward_kwargs)
    full = np.concatenate([agree, np.ones(agree.shape[:-1] + (1,), bool)], axis=-1)
    return EnvArrays(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(np.argmax(full, -1), jnp.int32),
                     jnp.asarray(np.asarray(layers), jnp.int32))


def observe(env: EnvArrays, state: EnvState):
    return env.hidden[state.episode, state.token, state.decision].astype(jnp.float32)


def reset(env: EnvArrays, key) -> EnvState:
    episode = jax.random.randint(key, (), 0, env.hidden.shape[0])
    zero = jnp.int32(0)
    return EnvState(episode.astype(jnp.int32), zero, zero, jnp.float32(0))


def step(env: EnvArrays, state: EnvState, action, key):
    """(next state, reward, done, info); a finished episode is replaced by a fresh one (auto-reset)."""
    tokens, decisions = env.hidden.shape[1], env.hidden.shape[2]
    reward = env.rewards[state.episode, state.token, state.decision, action]
    token_done = (action == EXIT) | (state.decision == decisions - 1)
    exit_index = jnp.where(action == EXIT, state.decision, decisions)  # the last layer when it ran through
    correct = exit_index == env.lstar_index[state.episode, state.token]
    token = state.token + token_done.astype(jnp.int32)
    episode_done = token_done & (token == tokens)
    ret = state.episode_return + reward
    fresh = reset(env, key)
    nxt = EnvState(state.episode, jnp.where(token_done, token, state.token),
                   jnp.where(token_done, 0, state.decision + 1).astype(jnp.int32), ret)
    nxt = jax.tree.map(lambda a, b: jnp.where(episode_done, a, b), fresh, nxt)
    info = StepInfo(token_done, env.layers[exit_index], correct, episode_done, ret)
    return nxt, reward, episode_done, info
