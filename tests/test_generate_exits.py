"""Early exits: the KV-cached decode step against a cache-free reference, batches against
single rows, the skip path against the masked path, and the policies' decisions.

The reference (generate_helpers.Reference) recomputes the whole sequence at every step
through the model's public pieces, freezing each position's hidden state after its exit
layer, so a skipped layer's K/V for that position come from its exit hidden state. A
decode step that skipped the K/V write of skipped layers, wrote it from another hidden
state, used a wrong cache slot or position, or recorded the wrong exit layer gives other
tokens, exit layers or logits.

Which test sees what: under FixedExit(k) every decoded token exits at k, so no token ever
reads a skipped layer's propagated K/V (layers after k never run for decoded tokens);
FixedExit pins positions, cache slots and exit bookkeeping. State propagation is pinned by
the thresholded policies (Confidence, Learned), whose exits go deeper on one token than on
an earlier one, against the reference's tokens and, teacher-forced, its logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import greencode_jax as gc
from generate_helpers import (  # noqa: F401 (fixtures)
    LLAMA, N_NEW, Reference, assert_reference_is_decisive, gen_models, learned_exit_probability, learned_policy, left_pad,
    llama, rows_of, run, unpad,
)
from greencode_jax.generate.decode import generate_jit

pytestmark = pytest.mark.usefixtures("highest_precision")

P = gc.policies
HIDDEN = 64  # LLAMA's hidden size

# Thresholds picked (and guarded by assert_reference_is_decisive) so that exits vary from
# token to token and from row to row on LLAMA's prompts below.
POLICIES = {
    "full": lambda: P.Full(),
    "fixed": lambda: P.FixedExit(1),
    "confidence": lambda: P.Confidence(0.065),
    "learned": lambda: learned_policy(HIDDEN, 0.7, seed=2, scale=3.0),
    # the same MLP as one Pallas kernel (interpreted on a CPU; generate.policy_kernel)
    "learned_fused": lambda: learned_policy(HIDDEN, 0.7, seed=2, scale=3.0, kernel="pallas"),
}
BATCH_ROWS = [40, 27]  # prompt lengths of the left-padded batch (one bucket of 64)


def row_of(out, row: int, keepdims: bool = False):
    """One row of a GenerateOutput ([N] arrays, or [1, N] with keepdims)."""
    index = slice(row, row + 1) if keepdims else row
    return type(out)(*(x[index] for x in out))


def assert_same_output(got, want, what=""):
    np.testing.assert_array_equal(got.exit_layers, want.exit_layers, err_msg=f"{what} exit layers")
    np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=f"{what} tokens")
    np.testing.assert_array_equal(got.lengths, want.lengths, err_msg=f"{what} lengths")


def assert_equals_reference(model, out_row, prompt, policy, what):
    ref = model.reference.generate(prompt, policy)
    assert_reference_is_decisive(ref, what)
    np.testing.assert_array_equal(out_row.exit_layers, ref.exit_layers, err_msg=f"{what}: exit layers")
    np.testing.assert_array_equal(out_row.tokens, ref.tokens, err_msg=f"{what}: tokens")
    return ref


# ---- 2. FixedExit(k) against the cache-free reference ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["opt_post_proj", LLAMA])
def test_fixed_exit_equals_cache_free_reference(gen_models, name):
    """Every exit layer k (the last one is Full()): same tokens and exit layers as the reference."""
    m = gen_models[name]
    prompt = rows_of(m, [37])[0]
    assert len(m.config.exit_layers) == 4
    seen = set()
    for k in m.config.exit_layers:
        out = run(m.ours, prompt[None], policy=P.FixedExit(k))
        assert out.exit_layers[0, 0] == m.last  # the prompt pass never exits
        assert (out.exit_layers[0, 1:] == k).all()
        assert_equals_reference(m, row_of(out, 0), prompt, P.FixedExit(k), f"{name} FixedExit({k})")
        seen.add(tuple(out.tokens[0]))
    # each exit layer decodes differently: the frozen states and their K/V really matter
    assert len(seen) == len(m.config.exit_layers)


def test_fixed_exit_left_padded_batch_equals_reference(llama):
    """A left-padded batch: every row is the reference run on its own unpadded prompt."""
    ids, mask = left_pad(rows_of(llama, BATCH_ROWS), llama.pad_id)
    for k in (0, 2):
        out = run(llama.ours, ids, mask, policy=P.FixedExit(k))
        for row in range(len(BATCH_ROWS)):
            assert_equals_reference(llama, row_of(out, row), unpad(ids, mask, row),
                                    P.FixedExit(k), f"FixedExit({k}) row {row}")


@pytest.mark.parametrize("kind", ["confidence", "learned", "learned_fused"])
def test_thresholded_policies_equal_cache_free_reference(llama, kind):
    """Exits that change from token to token: each token's exit layer and token as in the reference."""
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0]
    policy = POLICIES[kind]()
    out = run(llama.ours, prompt[None], policy=policy)
    assert len(set(out.exit_layers[0, 1:])) >= 3, "the policy should exit at several layers here"
    assert_equals_reference(llama, row_of(out, 0), prompt, policy, kind)


LOGITS_ATOL = 1e-4  # as the parity tests: fp32, highest matmul precision


@pytest.mark.parametrize("kind", ["confidence", "learned"])
def test_decode_step_logits_equal_reference_logits(llama, kind):
    """Logits, not only tokens: the decode step (internal API: decode.prefill / decode_token,
    driven the way generate_jit drives them) fed the reference's own tokens gives the
    reference's exit logits at every step. A state-propagation error too small to flip an
    argmax or an exit decision on these 15 tokens still fails here."""
    policy = POLICIES[kind]()
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0]
    ref = llama.reference.generate(prompt, policy)
    assert len(set(ref.exit_layers[1:])) >= 3
    assert_decode_logits_equal_reference(llama.ours, policy, prompt, ref)


def assert_decode_logits_equal_reference(model, policy, prompt, ref):
    """Drives decode.prefill / decode_token over the reference's tokens; compares exits and logits."""
    from flax import nnx

    from greencode_jax.generate import decode

    graphdef, state = nnx.split(model)
    width, cache_len = 64, 80  # the prompt's bucket, and room for the new tokens
    ids, valid = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
    ids[0, width - len(prompt):], valid[0, width - len(prompt):] = prompt, True

    @jax.jit
    def prompt_pass(state, ids, valid):
        model = nnx.merge(graphdef, state)
        last_hidden, keys, values = decode.prefill(model, ids, valid, cache_len)
        return model.exit_head(last_hidden), keys, values

    @jax.jit
    def decode_step(state, policy, token, position, keys, values, key_valid, slot):
        return decode.decode_token(nnx.merge(graphdef, state), policy, token, position, keys, values, key_valid,
                                   slot, True)

    logits, keys, values = prompt_pass(state, jnp.asarray(ids), jnp.asarray(valid))
    got_logits, got_exits = [np.asarray(logits[0])], [model.config.num_layers - 1]
    key_valid = np.concatenate([valid, np.zeros((1, cache_len - width), bool)], axis=1)
    for n in range(1, N_NEW):
        slot = width + n - 1  # key_valid: the slots written before this token
        logits, exit_layer, keys, values = decode_step(
            state, policy, jnp.asarray(ref.tokens[n - 1:n], jnp.int32), jnp.asarray([len(prompt) + n - 1], jnp.int32),
            keys, values, jnp.asarray(key_valid), jnp.int32(slot))
        key_valid[0, slot] = True
        got_logits.append(np.asarray(logits[0]))
        got_exits.append(int(exit_layer[0]))
    np.testing.assert_array_equal(got_exits, ref.exit_layers)
    np.testing.assert_allclose(np.stack(got_logits), ref.logits, rtol=0, atol=LOGITS_ATOL)


# ---- 3. per-sequence exits in a batch --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["confidence", "learned", "learned_fused"])
def test_batch_with_per_sequence_exits_equals_one_by_one(llama, kind):
    policy = POLICIES[kind]()
    rows = rows_of(llama, BATCH_ROWS)
    ids, mask = left_pad(rows, llama.pad_id)
    batch = run(llama.ours, ids, mask, policy=policy)
    exits = batch.exit_layers[:, 1:]
    # rows really exit at different layers within one step, and some tokens exit early
    assert (exits[0] != exits[1]).sum() >= 3, exits
    assert (exits < llama.last).any() and (exits == llama.last).any(), exits
    for row, prompt in enumerate(rows):
        alone = run(llama.ours, prompt[None], policy=policy)
        assert_same_output(row_of(batch, row, keepdims=True), alone, f"row {row}")


# ---- 4. skip path against masked path --------------------------------------------------------------------------------

# Full() never exits, so its skip branch is never taken and "skip" runs what "masked" runs:
# two compilations per batch size for a comparison the other kinds make with real skips.
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", [pytest.param("full", marks=pytest.mark.slow), "fixed", "confidence", "learned"])
def test_skip_path_equals_masked_path(llama, kind, batch):
    rows = rows_of(llama, BATCH_ROWS[:batch])
    ids, mask = left_pad(rows, llama.pad_id)
    policy = POLICIES[kind]()
    skip = run(llama.ours, ids, mask, policy=policy, strategy="skip")
    masked = run(llama.ours, ids, mask, policy=policy, strategy="masked")
    assert_same_output(skip, masked)
    if kind != "full":  # some step had every row exited early: the skip branch was really taken
        assert (skip.exit_layers[:, 1:] < llama.last).all(axis=0).any()


def test_sparse_exits_skip_several_layers_under_one_conditional(llama):
    """Exits (0, 3) on 4 layers: one conditional covers layers 1-3, so a token exiting at 0
    skips three layers at once and writes their three K/V from its exit hidden state. Both
    paths give the cache-free reference's tokens and exits, on tokens exiting at 0 and at 3,
    and the decode step its logits (a wrong propagated K/V too small to flip a token)."""
    sparse = gc.load_pretrained(llama.path, scan_layers=False, exit_layers=[0])
    assert sparse.config.exit_layers == (0, 3)
    policy = learned_policy(HIDDEN, 0.4, seed=3, scale=3.0)
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0]
    ref = Reference(sparse).generate(prompt, policy)
    assert_reference_is_decisive(ref, "sparse exits")
    assert set(ref.exit_layers[1:]) == {0, 3}
    for strategy in ("skip", "masked"):
        out = run(sparse, prompt[None], policy=policy, strategy=strategy)
        np.testing.assert_array_equal(out.exit_layers[0], ref.exit_layers, err_msg=f"{strategy}: exit layers")
        np.testing.assert_array_equal(out.tokens[0], ref.tokens, err_msg=f"{strategy}: tokens")
    assert_decode_logits_equal_reference(sparse, policy, prompt, ref)


def test_skip_strategy_lowers_to_one_conditional_per_decision(llama):
    """At batch 1 the skip path is a real `lax.cond` after each exit decision (nested: its
    skip branch covers every later layer, so a token pays one per decision it reaches), not
    a select that computes both branches. Before the first decision nothing can be skipped
    and Full() never decides: no conditional there (each one costs a launch on a GPU).
    Confidence's exit head needs none of its own. "masked" has none."""
    ids, valid = jnp.zeros((1, 64), jnp.int32), jnp.ones((1, 64), bool)

    def conditionals(policy, skip=True):
        lowered = generate_jit.lower(llama.ours, ids, valid, policy, jnp.asarray([-1], jnp.int32), jnp.int32(0),
                                     jax.random.key(0), jnp.int32(N_NEW), sampling=gc.Sampling(), token_slots=16,
                                     cache_len=80, skip=skip)
        return lowered.as_text().count("stablehlo.case")

    assert llama.config.exit_layers == (0, 1, 2, 3)  # the counts below: 3 decisions after layers 0, 1 and 2
    assert conditionals(P.FixedExit(jnp.int32(1))) == 3
    assert conditionals(P.FixedExit(jnp.int32(2), min_layer=2)) == 1
    assert conditionals(P.Confidence(jnp.float32(0.5))) == 3
    assert conditionals(P.Full()) == 0
    assert conditionals(P.FixedExit(jnp.int32(1)), skip=False) == 0
    assert conditionals(P.Confidence(jnp.float32(0.5)), skip=False) == 0


# ---- 5. policies' decisions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("measure", ["softmax_max", "top2_margin"])
def test_confidence_threshold_zero_exits_first_and_above_one_never(llama, measure):
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0][None]
    first = run(llama.ours, prompt, policy=P.Confidence(0.0, measure))
    assert first.exit_layers[0, 0] == llama.last
    assert (first.exit_layers[0, 1:] == llama.config.exit_layers[0]).all()
    never = run(llama.ours, prompt, policy=P.Confidence(1.01, measure))
    assert (never.exit_layers == llama.last).all()
    np.testing.assert_array_equal(never.tokens, run(llama.ours, prompt).tokens)  # == Full()
    assert_equals_reference(llama, row_of(first, 0), prompt[0], P.Confidence(0.0, measure),
                            f"{measure} 0")


def test_confidence_zero_exits_at_the_models_first_exit_layer(llama):
    """With exit_layers=[1] (so (1, 3)), threshold 0 exits at layer 1, not 0."""
    model = gc.load_pretrained(llama.path, exit_layers=[1], scan_layers=False)
    assert model.config.exit_layers == (1, 3)
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0][None]
    out = run(model, prompt, policy=P.Confidence(0.0))
    assert (out.exit_layers[0, 1:] == 1).all()
    # the same tokens as FixedExit(1) on the model with every exit layer
    np.testing.assert_array_equal(out.tokens, run(llama.ours, prompt, policy=P.FixedExit(1)).tokens)


@pytest.mark.parametrize("kind", ["fixed", "confidence", "learned"])
def test_min_layer_is_honoured(llama, kind):
    """Policies that would exit at layer 0 exit at min_layer=2 instead (and match the reference)."""
    policy = {"fixed": P.FixedExit(0, min_layer=2), "confidence": P.Confidence(0.0, min_layer=2),
              "learned": learned_policy(HIDDEN, -1.0, min_layer=2)}[kind]  # P(exit) > -1: always
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0]
    out = run(llama.ours, prompt[None], policy=policy)
    assert out.exit_layers[0, 0] == llama.last
    assert (out.exit_layers[0, 1:] == 2).all()
    assert_equals_reference(llama, row_of(out, 0), prompt, policy, kind)


def test_learned_decisions_match_a_hand_computed_mlp(llama):
    """P(exit) by hand (numpy MLP on the reference's hidden state of the first decoded token)
    decides the first decoded token's exit layer: the first exit layer with P(exit) > threshold."""
    prompt = rows_of(llama, [BATCH_ROWS[0]])[0]
    exits = [layer for layer in llama.config.exit_layers if layer != llama.last]
    base = learned_policy(HIDDEN, 0.5, seed=3, scale=3.0)
    # the first decoded token's hidden states do not depend on any exit (the prompt ran full depth)
    states = llama.reference.generate(prompt, P.Full()).hidden[1]
    probs = np.array([learned_exit_probability(base.params, states[layer]) for layer in exits])
    # the jitted MLP agrees with the hand computation
    got = np.asarray(jax.vmap(base.exit_probability)(jnp.asarray(states[exits])))
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert np.argmax(probs) != 0, f"pick another seed: P(exit) = {probs} already peaks at the first exit"
    levels = np.sort(probs)
    # below every P(exit): the first exit; between two: the first layer above; above all: no exit
    thresholds = [levels[0] - 0.01, *((levels[1:] + levels[:-1]) / 2), levels[-1] + 0.01]
    seen = set()
    for threshold in thresholds:
        assert np.abs(probs - threshold).min() > 1e-3, probs
        above = np.flatnonzero(probs > threshold)
        want = exits[above[0]] if above.size else llama.last
        out = run(llama.ours, prompt[None], policy=gc.policies.Learned(base.params, float(threshold)))
        assert out.exit_layers[0, 1] == want, (threshold, probs)
        seen.add(want)
    assert len(seen) >= 3  # the thresholds really move the decision, past the first exit too
