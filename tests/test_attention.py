"""Attention's query-block path (T == S) against a plain NumPy softmax attention."""

from __future__ import annotations

import numpy as np
import pytest

from greencode_jax.models import layers


def numpy_attention(q, k, v, mask, scale):
    """q [B,T,N,D], k [B,K,S,D], v [B,K,D,S], mask [B,T,S]; query head n reads K/V head n // (N/K)."""
    b, t, n, d = q.shape
    group = n // k.shape[1]
    out = np.zeros((b, t, n, d))
    for i in range(b):
        for h in range(n):
            scores = q[i, :, h] @ k[i, h // group].T * scale
            scores = np.where(mask[i], scores, -1e30)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            out[i, :, h] = (scores / scores.sum(-1, keepdims=True)) @ v[i, h // group].T
    return out.reshape(b, t, n * d)


@pytest.mark.parametrize("length", [layers.ATTENTION_QUERY_BLOCK * 2 + 5, layers.ATTENTION_QUERY_BLOCK - 3])
def test_blocked_causal_attention_matches_numpy(length):
    rng = np.random.default_rng(0)
    b, n, kv, d = 2, 4, 2, 8
    q = rng.standard_normal((b, length, n, d)).astype(np.float32)
    k = rng.standard_normal((b, kv, length, d)).astype(np.float32)
    v = rng.standard_normal((b, kv, d, length)).astype(np.float32)
    valid = np.ones((b, length), bool)
    valid[1, :7] = False  # left padding in the second row
    mask = np.asarray(layers.attention_mask(valid, valid))
    got = np.asarray(layers.dot_product_attention(q, k, v, mask, 0.3))
    want = numpy_attention(q.astype(np.float64), k, v, mask, 0.3)
    rows = valid[:, :, None].repeat(n * d, -1)  # padded queries see no key; their output is unused
    np.testing.assert_allclose(got[rows], want[rows], atol=2e-5)
