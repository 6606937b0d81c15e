"""Separate actor and critic MLPs (tanh, orthogonal init as Stable-Baselines3 and PureJaxRL).

The actor's parameters are laid out as `Learned` reads them ({"layers": [{"w", "b"}, ...]})
and `actor_logits` is the same arithmetic as `Learned.exit_probability`: the observation
normalised with the store's statistics, tanh layers, two logits (continue, exit). So the
policy trained here and the one deciding inside `generate` are one function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)  # as Learned: no TF32 on a GPU


def init_mlp(key, sizes, out_gain: float) -> list[dict]:
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        gain = out_gain if i == len(sizes) - 2 else jnp.sqrt(2.0)
        layers.append({"w": jax.nn.initializers.orthogonal(gain)(k, (a, b), jnp.float32), "b": jnp.zeros(b)})
    return layers


def init_actor_critic(key, obs_size: int, hidden=(64, 64)) -> dict:
    ka, kc = jax.random.split(key)
    return {"actor": init_mlp(ka, (obs_size, *hidden, 2), 0.01), "critic": init_mlp(kc, (obs_size, *hidden, 1), 1.0)}


def _mlp(layers, x):
    *body, last = layers
    for layer in body:
        x = jnp.tanh(_dot(x, layer["w"]) + layer["b"])
    return _dot(x, last["w"]) + last["b"]


def normalise(obs, obs_mean, obs_std):
    return (obs.astype(jnp.float32) - obs_mean) / obs_std


def actor_logits(actor, obs_mean, obs_std, obs):
    """[..., 2] logits (continue, exit) for raw hidden states [..., E]."""
    return _mlp(actor, normalise(obs, obs_mean, obs_std))


def critic_value(critic, obs_mean, obs_std, obs):
    return _mlp(critic, normalise(obs, obs_mean, obs_std))[..., 0]


def learned_params(actor, obs_mean, obs_std) -> dict:
    """The actor as `gc.policies.Learned` params."""
    return {"obs_mean": jnp.asarray(obs_mean), "obs_std": jnp.asarray(obs_std),
            "layers": [{"w": l["w"], "b": l["b"]} for l in actor]}
