"""The exit heads' distillation loss: values against NumPy, the fused gradient against JAX's own
autodiff of the plain formula and against central finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from greencode_jax.train.distill import linear_distillation


def numpy_reference(xs, w, teacher_x, targets, coefficients, temperature, ce_weight):
    """Σ_i c_i Σ_tokens [τ² KL(p || q_i) + λ CE_i], in float64 NumPy."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p = log_softmax(teacher_x @ w.T / temperature)
    total, kls = 0.0, []
    for x, c in zip(xs, coefficients):
        logits = x @ w.T
        log_q = log_softmax(logits / temperature)
        kl = float((np.exp(log_p) * (log_p - log_q)).sum())
        ce = float(-log_softmax(logits)[np.arange(len(targets)), targets].sum())
        kls.append(kl)
        total += c * (temperature**2 * kl + ce_weight * ce)
    return total, kls


def plain(xs, w, teacher_x, targets, coefficients, temperature, ce_weight):
    """The same loss written directly, for JAX's autodiff (no fused gradient)."""
    log_p = jax.nn.log_softmax(teacher_x @ w.T / temperature)
    logits = jnp.einsum("nte,ve->ntv", xs, w)
    log_q = jax.nn.log_softmax(logits / temperature)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=(1, 2))
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[None, :, None], axis=-1).sum(axis=(1, 2))
    return jnp.dot(coefficients, temperature**2 * kl + ce_weight * ce)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    n, tokens, e, v = 3, 7, 5, 11
    return (rng.normal(size=(n, tokens, e)), rng.normal(size=(v, e)), rng.normal(size=(tokens, e)),
            rng.integers(0, v, tokens), np.array([0.5, 0.3, 0.2]) / tokens)


@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.5, 0.3)])
def test_loss_and_kl_against_numpy(case, temperature, ce_weight):
    xs, w, teacher_x, targets, coefficients = case
    expected, kls = numpy_reference(xs, w, teacher_x, targets, coefficients, temperature, ce_weight)
    with jax.default_matmul_precision("highest"):
        loss, kl, *_ = linear_distillation(*(jnp.asarray(a, jnp.float32) for a in (xs, w, teacher_x)),
                                           jnp.asarray(targets), jnp.asarray(coefficients, jnp.float32),
                                           temperature, ce_weight)
    # float32 against float64: a few ulps of sums over 7 x 11 terms
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(kl), kls, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_fused_gradient_against_autodiff_and_finite_differences(case, temperature, ce_weight):
    xs, w, teacher_x, np_targets, np_coefficients = case
    args = [jnp.asarray(a, jnp.float32) for a in (w, teacher_x)]
    targets, coefficients = jnp.asarray(np_targets), jnp.asarray(np_coefficients, jnp.float32)

    def fused(x):
        return linear_distillation(x, *args, targets, coefficients, temperature, ce_weight)[0]

    with jax.default_matmul_precision("highest"):
        x32 = jnp.asarray(xs, jnp.float32)
        grad = np.asarray(jax.grad(fused)(x32))
        reference = np.asarray(jax.grad(lambda x: plain(x, *args, targets, coefficients, temperature, ce_weight))(x32))
    np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-6)  # two float32 programs
    # central differences of the float64 NumPy loss, at a few coordinates
    step = 1e-5
    for index in [(0, 0, 0), (1, 3, 2), (2, 6, 4)]:
        plus, minus = xs.copy(), xs.copy()
        plus[index] += step
        minus[index] -= step
        numeric = (numpy_reference(plus, w, teacher_x, np_targets, np_coefficients, temperature, ce_weight)[0]
                   - numpy_reference(minus, w, teacher_x, np_targets, np_coefficients, temperature,
                                     ce_weight)[0]) / (2 * step)
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-3, atol=1e-6)


def test_no_gradient_reaches_w_or_the_teacher(case):
    xs, w, teacher_x, targets, coefficients = (jnp.asarray(a) for a in case)
    grads = jax.grad(lambda w_, t_: linear_distillation(xs.astype(jnp.float32), w_, t_, targets,
                                                        coefficients.astype(jnp.float32))[0], argnums=(0, 1))(
        w.astype(jnp.float32), teacher_x.astype(jnp.float32))
    assert all(not np.any(np.asarray(g)) for g in grads)
