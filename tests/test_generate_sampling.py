"""Sampling (temperature, top-k, top-p with explicit keys) and stop tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import greencode_jax as gc
from generate_helpers import gen_models, left_pad, llama, rows_of, run  # noqa: F401 (fixtures)
from greencode_jax.generate.sampling import choose_tokens

# The same matmul precision as the other generate modules: it is part of the jit cache key,
# so their compilations are shared.
pytestmark = pytest.mark.usefixtures("highest_precision")

P = gc.policies
S = gc.Sampling
PROMPT_LEN = 40
BATCH_ROWS = [40, 27]  # as in test_generate_exits: the same compilations


@pytest.fixture(scope="module")
def prompt(llama):
    return rows_of(llama, [PROMPT_LEN])[0][None]


@pytest.fixture
def greedy(llama, prompt, highest_precision):
    return run(llama.ours, prompt).tokens


# ---- sampling through generate -------------------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_key_and_varies_across_keys(llama, prompt, greedy):
    """At temperature 1 this model's next-token distributions are flat (top probability ~0.1)."""
    sampling = S(temperature=1.0)
    a = run(llama.ours, prompt, sampling=sampling, key=jax.random.key(1))
    again = run(llama.ours, prompt, sampling=sampling, key=jax.random.key(1))
    np.testing.assert_array_equal(a.tokens, again.tokens)
    others = [run(llama.ours, prompt, sampling=sampling, key=jax.random.key(seed)).tokens[0] for seed in range(2, 6)]
    for other in others:
        assert (other != a.tokens[0]).sum() >= 5  # two keys share few tokens out of 15
    assert len({int(o[0]) for o in others}) >= 2  # even the first token (sampled after the prompt pass)
    assert (a.tokens != greedy).sum() >= 5
    assert (a.exit_layers == llama.last).all() and (a.lengths == a.tokens.shape[1]).all()


@pytest.mark.parametrize("sampling", [S(temperature=1.0, top_k=1), S(temperature=1.0, top_p=1e-6)],
                         ids=["top_k=1", "top_p=1e-6"])
def test_filters_that_keep_one_token_equal_greedy(llama, prompt, greedy, sampling):
    for seed in (0, 1):
        np.testing.assert_array_equal(run(llama.ours, prompt, sampling=sampling, key=jax.random.key(seed)).tokens,
                                      greedy)


# ---- choose_tokens (cheap: no model) --------------------------------------------------------------------------------

def sample_many(logits, sampling, n=4000, seed=0):
    """n draws of choose_tokens on one row of logits -> [n] tokens."""
    keys = jax.random.split(jax.random.key(seed), n)
    draw = jax.jit(jax.vmap(lambda key: choose_tokens(jnp.asarray(logits, jnp.float32)[None], sampling, key)[0]))
    return np.asarray(draw(keys))


def test_temperature_to_zero_is_greedy():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (64, 50)))
    greedy = choose_tokens(jnp.asarray(logits), S(), None)
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    for seed in range(3):
        got = choose_tokens(jnp.asarray(logits), S(temperature=1e-4), jax.random.key(seed))
        np.testing.assert_array_equal(got, greedy)


def test_temperature_scales_the_distribution():
    probs = np.array([0.5, 0.3, 0.2])
    for temperature in (1.0, 2.0):
        counts = np.bincount(sample_many(np.log(probs), S(temperature=temperature)), minlength=3)
        want = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
        np.testing.assert_allclose(counts / counts.sum(), want, atol=0.03)


def test_top_k_keeps_the_k_most_likely_tokens():
    logits = np.array([0.1, 2.0, -1.0, 1.5, 1.0, 0.0])
    got = set(sample_many(logits, S(temperature=1.0, top_k=3)))
    assert got == {1, 3, 4}


@pytest.mark.parametrize("top_p,support", [(0.45, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, support):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    got = set(sample_many(np.log(probs), S(temperature=1.0, top_p=top_p)))
    assert got == support


def test_different_keys_give_different_samples_on_a_flat_distribution():
    tokens = sample_many(np.zeros(100), S(temperature=1.0), n=2000)
    assert len(set(tokens)) >= 95
    counts = np.bincount(tokens, minlength=100)
    assert counts.max() < 50  # expected 20 each


# ---- stop tokens ---------------------------------------------------------------------------------------------------

def first_stop_candidate(base, row: int, other: int, start: int = 2):
    """A token of `row`'s output (first seen at step s >= start) that `other` never produces -> (token, s)."""
    for step in range(start, base.tokens.shape[1] - 2):
        token = base.tokens[row, step]
        if token not in base.tokens[row, :step] and token not in base.tokens[other]:
            return int(token), step
    raise AssertionError(f"no usable stop token in {base.tokens}")


def assert_stopped(out, base, row: int, step: int, pad: int):
    n = step + 1
    assert out.lengths[row] == n
    np.testing.assert_array_equal(out.tokens[row, :n], base.tokens[row, :n])
    np.testing.assert_array_equal(out.exit_layers[row, :n], base.exit_layers[row, :n])
    assert (out.tokens[row, n:] == pad).all()
    assert (out.exit_layers[row, n:] == -1).all()


@pytest.mark.parametrize("policy", [P.Full(), P.Confidence(0.065)], ids=["full", "confidence"])
def test_a_stop_token_ends_its_row_and_the_others_go_on(llama, policy):
    ids, mask = left_pad_rows(llama)
    base = run(llama.ours, ids, mask, policy=policy)
    n_new = base.tokens.shape[1]
    if isinstance(policy, P.Confidence):
        assert (base.exit_layers[:, 1:] < llama.last).any()  # -1 must replace real early exits too
    token, step = first_stop_candidate(base, 0, 1)
    out = run(llama.ours, ids, mask, policy=policy, stop_tokens=(token,))
    assert_stopped(out, base, 0, step, llama.pad_id)
    np.testing.assert_array_equal(out.tokens[1], base.tokens[1])
    np.testing.assert_array_equal(out.exit_layers[1], base.exit_layers[1])
    assert out.lengths[1] == n_new

    # a stop token as the very first token (chosen by the prompt pass): that row is one token long
    first = int(base.tokens[1, 0])
    out = run(llama.ours, ids, mask, policy=policy, stop_tokens=(first,))
    assert_stopped(out, base, 1, 0, llama.pad_id)
    assert out.exit_layers[1, 0] == llama.last
    if first in base.tokens[0]:  # row 0 meets it later: it stops there, after row 1 has been done for a while
        assert_stopped(out, base, 0, int(np.argmax(base.tokens[0] == first)), llama.pad_id)
    else:
        np.testing.assert_array_equal(out.tokens[0], base.tokens[0])


def test_every_row_stopping_ends_generation(llama):
    ids, mask = left_pad_rows(llama)
    base = run(llama.ours, ids, mask)
    token0, step0 = first_stop_candidate(base, 0, 1)
    token1, step1 = first_stop_candidate(base, 1, 0)
    out = run(llama.ours, ids, mask, stop_tokens=(token0, token1))
    assert_stopped(out, base, 0, step0, llama.pad_id)
    assert_stopped(out, base, 1, step1, llama.pad_id)


def test_default_stop_tokens_are_the_models_eos(llama, prompt):
    eos = llama.config.eos_token_id
    base = run(llama.ours, prompt, policy=P.FixedExit(1))
    assert eos in base.tokens[0, :-1], "this prompt's FixedExit(1) continuation must contain eos"
    step = int(np.argmax(base.tokens[0] == eos))
    out = run(llama.ours, prompt, policy=P.FixedExit(1), stop_tokens=None)
    assert_stopped(out, base, 0, step, llama.pad_id)


def left_pad_rows(llama):
    return left_pad(rows_of(llama, BATCH_ROWS), llama.pad_id)
