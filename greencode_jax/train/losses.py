"""The aggregated exit loss: next-token cross-entropy and token accuracy at every exit.

Exit i decodes decoder layer i's output through the model's own head: its final norm,
OPT's `project_out` when present, then the LM head (or the tied embedding). The last step,
logits = x W and their cross-entropy, is the costly one ([tokens, vocab] per exit), so it is
fused with its own gradient (`linear_cross_entropy`): one pass over the exits computes the
losses and, at once, the gradients with respect to each exit's head input and to W, so no
[n_exits, B, T, V] logits are ever stored and no logits are recomputed in the backward pass.
At most one exit's [B, T, V] block is alive at a time. Logits, log-softmax and the loss are
float32 whatever the compute dtype (the matmuls accumulate in float32).

Packed rows are scored like Hugging Face's `group_texts` training that GREEN-CODE used:
every position predicts the next token of its row (T - 1 predictions per row), across
document boundaries too (the EOS separator makes the next document's start predictable).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


class ExitMetrics(NamedTuple):
    loss: jax.Array  # scalar: sum_i w_i * exit_loss[i]
    exit_loss: jax.Array  # [n_exits] mean next-token cross-entropy (nats) per exit
    exit_accuracy: jax.Array  # [n_exits] fraction of next tokens that are the exit's argmax


def _dot(a, b):
    """a [M, K] @ b [K, N] with float32 accumulation: the layout XLA's CPU and accelerator matmuls take
    without copying an operand first."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_t(a, b):
    """a.T @ b for a [N, M], b [N, K] -> [M, K] (contracting the token axis both hold)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _scores(logits, targets):
    """Cross-entropy sum, correct count and, for the gradient, exp(logits - max) and its row sums.

    A prediction is correct when the target's logit is the row's maximum (argmax with ties
    counted as hits): it reuses the max of the stable log-sum-exp instead of a second
    index-tracking reduction over the vocabulary, which costs as much as the softmax on CPU."""
    peak = jnp.max(logits, axis=-1, keepdims=True)
    exps = jnp.exp(logits - peak)
    sums = jnp.sum(exps, axis=-1, keepdims=True)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    correct = jnp.sum((target_logit >= peak).astype(F32))
    return jnp.sum(peak + jnp.log(sums) - target_logit), correct, exps, sums


def _primal(xs, w_ev, w_ve, targets, coefficients):
    def one(_, x):
        ce, correct, _, _ = _scores(_dot(x, w_ev), targets)
        return None, (ce, correct)

    _, (ce, correct) = jax.lax.scan(one, None, xs)
    return jnp.dot(coefficients, ce), ce, correct


_linear_cross_entropy = jax.custom_vjp(_primal)


def _forward(xs, w_ev, w_ve, targets, coefficients):
    def one(dw_ev, inputs):
        x, coefficient = inputs
        logits = _dot(x, w_ev)
        ce, correct, exps, sums = _scores(logits, targets)
        # d(coefficient * CE sum) / d logits = coefficient * (softmax - one_hot(target))
        vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
        dlogits = (exps * (coefficient / sums) - coefficient * (vocab[None, :] == targets[:, None])).astype(x.dtype)
        dx = _dot(dlogits, w_ve)  # [N, E]
        return dw_ev + _dot_t(x, dlogits), (ce, correct, dx.astype(x.dtype))  # W's gradient, as [E, V]

    dw_ev, (ce, correct, dxs) = jax.lax.scan(one, jnp.zeros(w_ev.shape, F32), (xs, coefficients))
    residuals = (dxs, dw_ev.astype(w_ev.dtype), targets, coefficients)
    return (jnp.dot(coefficients, ce), ce, correct), residuals


def _backward(residuals, cotangents):
    dxs, dw_ev, targets, coefficients = residuals
    g = cotangents[0]  # the per-exit outputs are stop_gradient-ed by the caller: their cotangents are zero
    # W enters twice (as [E, V] and [V, E]); its whole gradient is carried by the [E, V] copy
    return (dxs * g.astype(dxs.dtype), dw_ev * g.astype(dw_ev.dtype), None, None, jnp.zeros_like(coefficients))


_linear_cross_entropy.defvjp(_forward, _backward)


def linear_cross_entropy(xs, w, targets, coefficients):
    """sum_i coefficients[i] * CE_sum(xs[i] W^T, targets), and per exit the CE sum and the correct count.

    xs [n, N, E] (each exit's head input), W [V, E] (the tied embedding or the LM head's kernel,
    both stored vocabulary-major), targets [N] int. W is laid out both ways once, so that every
    matmul of every exit reads its operands as stored. Only the first output is differentiable
    (w.r.t. xs and W); the per-exit values are metrics.
    """
    loss, ce, correct = _linear_cross_entropy(xs, w.T, jax.lax.stop_gradient(w), targets, coefficients)
    return loss, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(correct)


def head_input(model, h):
    """The exit head up to its last matmul: the final norm, then OPT's project_out (`EarlyExitLM.exit_head`)."""
    if model.final_norm is not None:
        h = model.final_norm(h)
    if model.project_out is not None:
        h = model.project_out(h)
    return h


def head_weight(model):
    """W [V, E]: the tied embedding, or the LM head's kernel (stored [out, in])."""
    if model.lm_head is None:
        return model.embed_tokens.embedding[...]
    return model.lm_head.kernel[...]


def exit_metrics(model, tokens, weights) -> ExitMetrics:
    """Per-exit next-token cross-entropy and accuracy of `model` on `tokens` [B, T], and
    their `weights`-weighted sum (weights in `model.config.exit_layers` order)."""
    hidden = model(tokens).exit_hidden[:, :, :-1]  # [n_exits, B, T-1, H]; the unused exit logits are dead code
    targets = tokens[:, 1:].reshape(-1)
    n, b, t, _ = hidden.shape
    xs = head_input(model, model.through_heads(hidden)).reshape(n, b * t, -1)
    w = head_weight(model)
    count = targets.size
    coefficients = jnp.asarray(weights, F32) / count
    loss, ce, correct = linear_cross_entropy(xs, w.astype(xs.dtype), targets, coefficients)
    return ExitMetrics(loss, ce / count, correct / count)
