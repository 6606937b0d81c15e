"""Learning-rate schedules and the weight-decay groups of the optimiser."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from greencode_jax.errors import GreencodeError
from greencode_jax.train.optimizer import learning_rate_schedule, make_optimizer


def test_warmup_then_constant():
    schedule = learning_rate_schedule(1e-3, 10, 100, "constant")
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    for step in (10, 50, 100, 1000):
        assert float(schedule(step)) == pytest.approx(1e-3)


def test_warmup_then_cosine_to_the_final_ratio():
    peak, warmup, total, final = 2e-3, 10, 110, 0.1
    schedule = learning_rate_schedule(peak, warmup, total, "cosine", final)
    assert float(schedule(warmup)) == pytest.approx(peak)
    for step in (35, 60, 85):  # closed form of a cosine decay from peak to final*peak over 100 steps
        progress = (step - warmup) / (total - warmup)
        expected = peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(total)) == pytest.approx(final * peak, rel=1e-5)


def test_no_warmup_starts_at_the_peak():
    assert float(learning_rate_schedule(1e-4, 0, 10, "constant")(0)) == pytest.approx(1e-4)


def test_unknown_schedule_is_refused():
    with pytest.raises(GreencodeError, match="train.schedule='linear'"):
        learning_rate_schedule(1e-4, 0, 10, "linear")


def test_weight_decay_spares_biases_and_norm_scales():
    """With a zero gradient, AdamW only decays: kernels and embeddings shrink by lr*wd, the rest stays."""
    params = {"embed_tokens": {"embedding": jnp.ones((4, 2))},
              "layers": {"attn": {"q_proj": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((3, 2))}},
                         "attn_norm": {"scale": jnp.ones((3, 2))}},
              "final_norm": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))}}
    lr, wd = 0.1, 0.5
    optimizer = make_optimizer(learning_rate_schedule(lr, 0, 10), wd, clip_norm=1.0)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    decayed = {"embedding", "kernel"}
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = path[-1].key
        expected = -lr * wd if name in decayed else 0.0
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=name)
