"""The exit heads' loss on a frozen backbone: distillation from the last layer.

For every exit i with a head, over every position,

    loss_i = τ² · KL(p_T || q_i) + λ · CE(q_i at τ = 1, next token)
    p_T = softmax(z_last / τ),  q_i = softmax(z_i / τ),  z = W · head_input(h)

and the loss is Σ_i w_i · mean over positions of loss_i (w: the exit weights; τ, λ: the
temperature and `train.ce_weight`). z_last is the frozen model's own last-layer prediction, so
the heads learn to predict what the full model will say (tuned lens), not the corpus.

As in the fine-tune's cross-entropy (losses.py), the costly step is the [tokens, vocab] product
with W; it is fused with its gradient: one pass per exit computes the loss and the gradient
with respect to that exit's head input. W, the final norm and the backbone are frozen: no
gradient reaches them, and no backward pass runs through the backbone at all.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from greencode_jax.train.losses import F32, _dot, head_input, head_weight


class DistillMetrics(NamedTuple):
    loss: jax.Array  # scalar: Σ_i w_i (τ² KL_i + λ CE_i)
    kl: jax.Array  # [n_heads] mean KL(p_T || q_i) at temperature τ (nats)
    agreement: jax.Array  # [n_heads] fraction of positions whose argmax equals the last layer's
    exit_loss: jax.Array  # [n_heads] mean next-token cross-entropy at τ = 1
    exit_accuracy: jax.Array  # [n_heads] fraction of next tokens that are the exit's argmax


def _log_softmax_parts(logits):
    peak = jnp.max(logits, axis=-1, keepdims=True)
    exps = jnp.exp(logits - peak)
    sums = jnp.sum(exps, axis=-1, keepdims=True)
    return peak, exps, sums


def _exit_terms(x, w_ev, log_p, p, teacher_top, targets, temperature, ce_weight):
    """One exit: (KL sum, CE sum, agreement count, correct count, d(τ² KL + λ CE)/d logits)."""
    logits = _dot(x, w_ev)  # [N, V] float32
    peak, exps, sums = _log_softmax_parts(logits / temperature)
    log_q = logits / temperature - peak - jnp.log(sums)
    kl = jnp.sum(p * (log_p - log_q))
    q = exps / sums
    # d(τ² KL)/d logits = τ² (q - p) / τ
    dlogits = temperature * (q - p)
    raw_peak, raw_exps, raw_sums = (peak, exps, sums) if temperature == 1.0 else _log_softmax_parts(logits)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    ce = jnp.sum(raw_peak + jnp.log(raw_sums) - target_logit)
    correct = jnp.sum((target_logit >= raw_peak).astype(F32))  # ties count as hits, as in losses._scores
    agree = jnp.sum((jnp.take_along_axis(logits, teacher_top[:, None], axis=-1) >= jnp.max(logits, -1, keepdims=True))
                    .astype(F32))
    if ce_weight:
        vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
        dlogits = dlogits + ce_weight * (raw_exps / raw_sums - (vocab[None, :] == targets[:, None]))
    return kl, ce, agree, correct, dlogits


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _distill(xs, w_ev, w_ve, log_p, teacher_top, targets, coefficients, temperature, ce_weight):
    return _forward(xs, w_ev, w_ve, log_p, teacher_top, targets, coefficients, temperature, ce_weight)[0]


def _forward(xs, w_ev, w_ve, log_p, teacher_top, targets, coefficients, temperature, ce_weight):
    p = jnp.exp(log_p)

    def one(_, inputs):
        x, coefficient = inputs
        kl, ce, agree, correct, dlogits = _exit_terms(x, w_ev, log_p, p, teacher_top, targets, temperature,
                                                      ce_weight)
        dx = _dot((coefficient * dlogits).astype(x.dtype), w_ve)  # [N, E]
        return None, (kl, ce, agree, correct, dx.astype(x.dtype))

    _, (kl, ce, agree, correct, dxs) = jax.lax.scan(one, None, (xs, coefficients))
    loss = jnp.dot(coefficients, temperature**2 * kl + ce_weight * ce)
    return (loss, kl, ce, agree, correct), (dxs,)


def _backward(temperature, ce_weight, residuals, cotangents):
    (dxs,) = residuals
    g = cotangents[0]  # only the loss is differentiated; the rest are metrics
    return dxs * g.astype(dxs.dtype), None, None, None, None, None, None


_distill.defvjp(_forward, _backward)


def linear_distillation(xs, w, teacher_x, targets, coefficients, temperature: float = 1.0, ce_weight: float = 0.0):
    """xs [n, N, E] (each head's input to W), W [V, E], teacher_x [N, E] (the last layer's), targets
    [N]; coefficients [n] (exit weight / N). Returns (loss, KL sums, CE sums, agreement counts,
    correct counts); only the loss is differentiable, and only with respect to xs."""
    w = jax.lax.stop_gradient(w)
    teacher = jax.lax.stop_gradient(_dot(teacher_x, w.T))
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    top = jnp.argmax(teacher, axis=-1).astype(targets.dtype)
    loss, kl, ce, agree, correct = _distill(xs, w.T, w, log_p, top, targets, coefficients, float(temperature),
                                            float(ce_weight))
    stop = jax.lax.stop_gradient
    return loss, stop(kl), stop(ce), stop(agree), stop(correct)


def distill_metrics(model, exit_hidden, targets, weights, temperature: float, ce_weight: float) -> DistillMetrics:
    """The heads' loss from exit_hidden [n_exits, N, E] (the model's exits in order, the last layer
    last, as the frozen backbone computed them) and the next tokens [N]. `weights` [n_exits - 1]:
    one per exit with a head."""
    heads = model.config.exit_layers[:-1]
    hidden = jax.lax.stop_gradient(exit_hidden)
    xs = head_input(model, model.through_heads_of(hidden[:-1], heads))
    teacher_x = jax.lax.stop_gradient(head_input(model, hidden[-1]))
    w = head_weight(model)
    count = targets.size
    coefficients = jnp.asarray(weights, F32) / count
    loss, kl, ce, agree, correct = linear_distillation(xs, w.astype(xs.dtype), teacher_x.astype(xs.dtype), targets,
                                                       coefficients, temperature, ce_weight)
    return DistillMetrics(loss, kl / count, agree / count, ce / count, correct / count)
