"""The recording mode of generation: greedy full-depth decoding that keeps, for every
generated token and every decision exit, the exit layer's hidden state and what its head
predicts. The RL stage (rl.collect) trains the exit policy on these arrays.

It is the generation's own program, not a second model: the prefill of decode.prefill
(which records the prompt's last position) and per token the same blocks, in the same
order, as decode.decode_token at full depth. Token n's record is the state from which
token n is predicted: for n = 0 the prompt's last position, after that the previous token's
decode step. The decode loop is a `fori_loop` whose buffers live in its carry (written with
`dynamic_update_slice`), so no cache is copied per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from greencode_jax.generate.decode import index_after, prefill
from greencode_jax.models.layers import attention_mask


class Recording(NamedTuple):
    tokens: jax.Array  # [B, N] greedy tokens at full depth
    hidden: jax.Array  # [B, N, X, E] hidden state after each decision exit layer, from which token n is predicted
    agree: jax.Array  # [B, N, X] bool: that exit's argmax equals the final layer's (= tokens)
    confidence: jax.Array  # [B, N, X] float32: that exit's top softmax probability (Confidence's softmax_max)


def decision_exits(config) -> tuple[int, ...]:
    """The exit layers a policy decides at: every exit but the last layer."""
    return tuple(e for e in config.exit_layers if e < config.num_layers - 1)


def _exit_predictions(model, hidden, layers):
    """argmax and top probability of the exit heads of `layers` over hidden [B, X, E] (each exit
    through its own head when the model has exit heads): one flat [B*X, E] shared-head call (a
    batched 3-D head is slower on CPU), float32 softmax."""
    b, x, e = hidden.shape
    hidden = jnp.swapaxes(model.through_heads_of(jnp.swapaxes(hidden, 0, 1), layers), 0, 1)
    logits = model.shared_head(hidden.reshape(b * x, e))
    top = jnp.argmax(logits, axis=-1)
    confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    return top.reshape(b, x).astype(jnp.int32), confidence.reshape(b, x)


def _record_token(model, token, position, keys, values, key_valid, slot, record):
    """One token at full depth. Returns (final logits [B, V], recorded [B, X, E], keys, values)."""
    batch = token.shape[0]
    h = model.embed(token[:, None], position[:, None])
    cos, sin = model.rope(position[:, None])
    mask = attention_mask(jnp.ones((batch, 1), bool), key_valid, slot[None, None], jnp.arange(key_valid.shape[1])[None])
    new_kv, recorded = [], []
    for i in range(model.config.num_layers):
        block = model.block(i)
        x = block.attention_input(h)
        k, v = block.attn.key_value(x, cos, sin)
        h = block.finish(h, x, keys[i], values[i], mask, cos, sin, (k, v))
        new_kv.append((k, v))
        if i in record:
            recorded.append(h[:, 0])
    logits = model.exit_head(h[:, 0])
    at = index_after(slot, logits)  # after the attention read the old cache (see decode.index_after)
    keys = tuple(jax.lax.dynamic_update_slice(c, k, (0, 0, at, 0)) for c, (k, _) in zip(keys, new_kv))
    values = tuple(jax.lax.dynamic_update_slice(c, v, (0, 0, 0, at)) for c, (_, v) in zip(values, new_kv))
    return logits, jnp.stack(recorded, axis=1), keys, values


def record_program(model, ids, valid, *, new_tokens: int, hidden_dtype=jnp.float32) -> Recording:
    """Greedy full-depth generation of `new_tokens` tokens after left-padded prompts `ids`
    [B, S] (`valid` marks real tokens), recording every decision exit. No stop tokens: an
    episode always has `new_tokens` tokens."""
    config = model.config
    record = decision_exits(config)
    batch, prompt_len = ids.shape
    cache_len = prompt_len + new_tokens
    last_hidden, keys, values, states = prefill(model, ids, valid, cache_len, record=record)
    first = jnp.argmax(model.exit_head(last_hidden), axis=-1).astype(jnp.int32)
    top, conf = _exit_predictions(model, states, record)
    x, e = len(record), config.hidden_size
    hidden = jnp.zeros((batch, new_tokens, x, e), hidden_dtype).at[:, 0].set(states.astype(hidden_dtype))
    agree = jnp.zeros((batch, new_tokens, x), bool).at[:, 0].set(top == first[:, None])
    confidence = jnp.zeros((batch, new_tokens, x), jnp.float32).at[:, 0].set(conf)
    tokens = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(first)
    key_valid = jnp.zeros((batch, cache_len), bool).at[:, :prompt_len].set(valid)
    position = valid.sum(1).astype(jnp.int32)

    def body(n, carry):
        token, position, keys, values, key_valid, tokens, hidden, agree, confidence = carry
        slot = prompt_len + n - 1  # the cache slot of `token`, the input of this step
        logits, states, keys, values = _record_token(model, token, position, keys, values, key_valid, slot, record)
        key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((batch, 1), bool), (0, slot))
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        top, conf = _exit_predictions(model, states, record)
        hidden = jax.lax.dynamic_update_slice(hidden, states.astype(hidden_dtype)[:, None], (0, n, 0, 0))
        agree = jax.lax.dynamic_update_slice(agree, (top == nxt[:, None])[:, None], (0, n, 0))
        confidence = jax.lax.dynamic_update_slice(confidence, conf[:, None], (0, n, 0))
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, n))
        return nxt, position + 1, keys, values, key_valid, tokens, hidden, agree, confidence

    carry = (first, position, keys, values, key_valid, tokens, hidden, agree, confidence)
    *_, tokens, hidden, agree, confidence = jax.lax.fori_loop(1, new_tokens, body, carry)
    return Recording(tokens, hidden, agree, confidence)


record_jit = jax.jit(record_program, static_argnames=("new_tokens", "hidden_dtype"))
