"""The sharded train step: gradient accumulation, bf16 compute over fp32 master weights,
clipping and AdamW, all in one `jit` over the mesh.

The train state is a plain dict, so Orbax saves and restores it as is:
    {"step": int32 [], "params": fp32 parameter tree, "opt_state": optax state, "rng": uint32 [2]}
`rng` is split once per step (the step's key is free for stochastic features such as
dropout; the model has none today), and saved, so a resumed run continues its stream.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from greencode_jax.models import ModelConfig, abstract_model, resolve_dtype
from greencode_jax.train.losses import exit_metrics
from greencode_jax.train.sharding import replicated, tree_shardings


def compute_graphdef(config: ModelConfig, compute_dtype):
    """The model's structure with compute-dtype layers (nnx.Linear computes in its `dtype`)."""
    return nnx.graphdef(abstract_model(config, compute_dtype))


def cast_tree(tree, dtype):
    dtype = resolve_dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss_fn(config: ModelConfig, weights, compute_dtype) -> Callable:
    """loss_fn(params, tokens [B, T]) -> (loss, (exit_loss, exit_accuracy)) at `compute_dtype`."""
    graphdef = compute_graphdef(config, compute_dtype)

    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, cast_tree(params, compute_dtype))
        out = exit_metrics(model, tokens, weights)
        return out.loss, (out.exit_loss, out.exit_accuracy)

    return loss_fn


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)}


def state_shardings(abstract_state, config: ModelConfig, mesh: Mesh):
    return tree_shardings(abstract_state, mesh, config.hidden_size, config.word_embed_dim)


def make_train_step(config: ModelConfig, weights, optimizer: optax.GradientTransformation, schedule,
                    compute_dtype, state_sharding, tokens_sharding: NamedSharding, flags_sharding: NamedSharding):
    """step(state, tokens [A, B, T], stop_flags [devices]) -> (state, metrics), jitted and sharded.

    The gradient is the mean over the A micro-batches of each micro-batch's mean-token
    gradient, which equals the gradient over the whole A*B batch (every micro-batch has
    the same number of tokens). `stop_flags` carries each process's "stop requested" bit
    (SIGTERM) into the step; the replicated `any` in the metrics lets every host stop at
    the same step.
    """
    loss_and_grad = jax.value_and_grad(make_loss_fn(config, weights, compute_dtype), has_aux=True)

    def step(state, tokens, stop_flags):
        params = state["params"]
        accum = tokens.shape[0]
        if accum == 1:
            (loss, (exit_loss, exit_acc)), grads = loss_and_grad(params, tokens[0])
        else:
            def micro(carry, micro_tokens):
                (loss, aux), grads = loss_and_grad(params, micro_tokens)
                summed = jax.tree.map(jnp.add, carry[0], grads)
                return (summed, carry[1] + loss, carry[2] + aux[0], carry[3] + aux[1]), None

            n = len(config.exit_layers)
            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                     jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
            (grads, loss, exit_loss, exit_acc), _ = jax.lax.scan(micro, zeros, tokens)
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, exit_loss, exit_acc = loss / accum, exit_loss / accum, exit_acc / accum
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        metrics = {"loss": loss, "exit_loss": exit_loss, "exit_accuracy": exit_acc,
                   "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(new_params),
                   "learning_rate": schedule(state["step"]), "stop": jnp.any(stop_flags)}
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    mesh = tokens_sharding.mesh
    return jax.jit(step, in_shardings=(state_sharding, tokens_sharding, flags_sharding),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))
