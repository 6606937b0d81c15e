"""Per-row decoding for serve's continuous batching: the `PerRow` policy and decode_token's [B] slots.

`PerRow.decide` is checked row by row against each single-kind policy's own `decide` on the
same hidden states and logits (and those against numpy's statistics, test_generate_exits).
decode_token with a [B] slot vector is checked against the scalar-slot path it generalises:
rows at different slots each equal that row run alone at its slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import greencode_jax as gc
from generate_helpers import gen_models, learned_policy, llama, rows_of  # noqa: F401 (fixtures)
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.decode import decode_token, prefill
from greencode_jax.generate.row_policy import PerRow

P = gc.policies
HIDDEN, VOCAB = 16, 40


def _mixed_policies(learned):
    """Every kind, with thresholds that both exit and stay on the rows below."""
    return [P.Full(), P.FixedExit(1), P.FixedExit(3), P.Confidence(0.08), P.Confidence(0.5),
            P.Confidence(0.02, measure="top2_margin"), P.Learned(learned.params, 0.3), P.Learned(learned.params, 0.7),
            P.Full()]


def _inputs(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(rows, HIDDEN)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(rows, VOCAB)) * 2.0, jnp.float32)
    return hidden, logits


def test_per_row_decisions_equal_each_single_kind_policy():
    learned = learned_policy(HIDDEN, 0.5, seed=1, scale=3.0)
    policies = _mixed_policies(learned)
    rows = PerRow.of(policies, learned_params=learned.params)
    hidden, logits = _inputs(len(policies))
    decided_any = set()
    for layer in (0, 1, 2, 3):
        got = np.asarray(jax.jit(lambda r, h, lg: r.decide(layer, h, lg))(rows, hidden, logits))
        for b, policy in enumerate(policies):
            want = bool(np.asarray(policy.decide(layer, hidden, logits))[b])
            assert got[b] == want, f"row {b} ({policy}) at layer {layer}"
            decided_any.add((type(policy).__name__, want))
    # the rows exercise both outcomes of every thresholded kind (else the comparison says little)
    assert {("Confidence", True), ("Confidence", False), ("Learned", True), ("Learned", False),
            ("FixedExit", True), ("FixedExit", False)} <= decided_any


def test_per_row_without_logits_decides_fixed_and_learned_rows():
    learned = learned_policy(HIDDEN, 0.5, seed=1, scale=3.0)
    policies = [P.FixedExit(2), learned, P.Full()]
    rows = PerRow.of(policies, learned_params=learned.params)
    assert not rows.needs_logits
    hidden, _ = _inputs(3, seed=3)
    got = np.asarray(rows.decide(2, hidden, None))
    want = [bool(np.asarray(p.decide(2, hidden, None))[b]) for b, p in enumerate(policies)]
    assert got.tolist() == want


def test_per_row_refuses_a_second_actor_and_confidence_without_logits():
    a, b = learned_policy(HIDDEN, 0.5, seed=1), learned_policy(HIDDEN, 0.5, seed=2)
    with pytest.raises(GreencodeError, match="share the one actor"):
        PerRow.of([a, b], learned_params=a.params)
    with pytest.raises(GreencodeError, match="needs_logits"):
        PerRow.of([P.Confidence(0.5)], needs_logits=False)


def test_decode_token_per_row_slots_equal_each_row_alone(llama):
    """Two prompts prefilled into one cache, each row at its own slot: per-row logits, exits and
    K/V equal the scalar-slot step of that row alone (the same arithmetic on one row: float32
    rounding of a batch-2 vs batch-1 matmul may differ, hence the tolerance)."""
    model = llama.ours
    cache_len = 80
    prompts = rows_of(llama, [20, 33])
    caches, firsts = [], []
    for prompt in prompts:
        ids = jnp.asarray(np.pad(prompt, (64 - len(prompt), 0))[None], jnp.int32)
        valid = jnp.asarray(np.arange(64) >= 64 - len(prompt))[None]
        last, keys, values = prefill(model, ids, valid, cache_len)
        caches.append((keys, values, jnp.zeros((1, cache_len), bool).at[:, :64].set(valid)))
        firsts.append(jnp.argmax(model.exit_head(last), -1).astype(jnp.int32))
    policy = P.Confidence(0.065)
    slot = jnp.asarray([64, 64 + 5], jnp.int32)  # row 1 as if 5 tokens further on (its extra cache slots stay invalid)
    position = jnp.asarray([len(p) for p in prompts], jnp.int32)
    token = jnp.concatenate(firsts)
    keys = tuple(jnp.concatenate([c[0][i] for c in caches]) for i in range(model.config.num_layers))
    values = tuple(jnp.concatenate([c[1][i] for c in caches]) for i in range(model.config.num_layers))
    key_valid = jnp.concatenate([c[2] for c in caches])
    rows = PerRow.of([policy, policy])
    logits, exits, new_keys, new_values = decode_token(model, rows, token, position, keys, values, key_valid, slot,
                                                       skip=True)
    for b in range(2):
        k, v, valid = caches[b]
        want_logits, want_exit, want_keys, want_values = decode_token(
            model, policy, token[b:b + 1], position[b:b + 1], k, v, valid, slot[b], skip=True)
        np.testing.assert_allclose(logits[b], want_logits[0], rtol=1e-5, atol=1e-5)
        assert int(exits[b]) == int(want_exit[0])
        for got, want in ((new_keys, want_keys), (new_values, want_values)):
            np.testing.assert_allclose(got[0][b], want[0][0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[-1][b], want[-1][0], rtol=1e-5, atol=1e-5)
    # each row's K/V landed at its own slot only
    changed = np.flatnonzero(np.any(np.asarray(new_keys[0][1] != keys[0][1]), axis=(0, 2)))
    assert changed.tolist() == [69]
