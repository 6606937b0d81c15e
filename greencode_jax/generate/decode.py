"""KV-cached early-exit decoding, the whole generation inside one `jit`.

Per token, layer by layer:
  1. the layer's input norm and K/V projection run for every sequence and are written
     to its cache slot (for a sequence that has exited, from its frozen exit hidden
     state: CALM-style state propagation, so later tokens can attend at every layer);
  2. the rest of the layer (queries, attention, MLP) runs under `lax.cond`, skipped
     when every sequence in the batch has exited; otherwise computed for the batch and
     masked, so an exited sequence keeps its exit hidden state. There is one conditional
     per exit decision, whose skip branch covers all the layers after it (see decode_token);
  3. after each configured exit layer the policy decides, per sequence.
The LM head runs once per token, on each sequence's exit hidden state through that exit's own
head when the model has exit heads (a policy that needs logits to decide, such as Confidence,
also runs it at each exit it considers).

The cache is a tuple of per-layer arrays carried through a `lax.while_loop`, updated in
place with `dynamic_update_slice`; only the slice of the layer being computed is read.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from greencode_jax.generate.sampling import Sampling, choose_tokens
from greencode_jax.models.layers import attention_mask


class DecodeState(NamedTuple):
    step: jax.Array  # scalar int32: tokens generated so far
    remaining: jax.Array  # scalar int32: tokens still to generate (at most)
    token: jax.Array  # [B] the last token, input of the next step
    position: jax.Array  # [B] its position id
    done: jax.Array  # [B] bool: a stop token was emitted
    keys: tuple  # per layer [B, K, S, D] (see models.layers.dot_product_attention)
    values: tuple  # per layer [B, K, D, S]
    key_valid: jax.Array  # [B, S] bool: which cache slots hold real tokens
    tokens: jax.Array  # [B, N] tokens chosen (a row's slots after its stop hold junk, masked at the end)
    exit_layers: jax.Array  # [B, N] their exit layers (-1 after a stop and past the last token)
    rng: jax.Array


def prefill(model, ids, valid, cache_len: int, record=()):
    """Full-depth forward over the prompt, filling every layer's cache. Returns the last hidden
    state and the caches; with `record` (layer indices), also the last position's hidden state
    after each of those layers, [B, len(record), E] (the recording mode of generate.record)."""
    positions = model.positions(valid)
    h = model.embed(ids, positions)
    cos, sin = model.rope(positions)
    mask = attention_mask(valid, valid)
    keys, values, recorded = [], [], []
    grow = cache_len - ids.shape[1]
    for i in range(model.config.num_layers):
        block = model.block(i)
        x = block.attention_input(h)
        k, v = block.attn.key_value(x, cos, sin)
        h = block.finish(h, x, k, v, mask, cos, sin)
        if i in record:
            recorded.append(h[:, -1])
        keys.append(jnp.pad(k, ((0, 0), (0, 0), (0, grow), (0, 0))))
        values.append(jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, grow))))
    if record:
        return h[:, -1], tuple(keys), tuple(values), jnp.stack(recorded, axis=1)
    return h[:, -1], tuple(keys), tuple(values)


def index_after(index, value):
    """`index`, unchanged, but computed from `value`, so what it indexes runs after `value`.

    XLA orders operations by data dependence only (optimization barriers are gone before
    copy insertion), and an in-place cache update that might run before the attention's
    read of the old cache makes it copy the whole cache, every layer, every token: 35 % of
    an OPT-125m decode step on CPU. min(i, i + isnan) is i even when `value` is NaN.
    """
    first = jax.lax.index_in_dim(value.reshape(-1), 0, keepdims=False)
    return jnp.minimum(index, index + jnp.isnan(first).astype(index.dtype))


def decision_layers(config, policy) -> tuple[int, ...]:
    """The layers after which `policy` decides: the model's exit layers from its min_layer on,
    the last layer aside (a token that reaches it has no earlier exit left). Full() never
    exits, so it decides nowhere and its decode step has no conditional at all."""
    if policy.kind == "full":
        return ()
    return tuple(e for e in config.exit_layers if policy.min_layer <= e < config.num_layers - 1)


def segments(num_layers: int, decisions) -> list[range]:
    """The layers split after each decision layer: the layers one decision leads to."""
    bounds = [0, *(d + 1 for d in decisions), num_layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def decode_token(model, policy, token, position, keys, values, key_valid, slot, skip: bool, finished=None):
    """One token through the early-exit stack. Returns (logits [B, V], exit layer [B], keys, values).

    `key_valid` marks the cache slots written before this token; its own K/V go to `slot`: a
    scalar (generate: every row at one slot) or a [B] vector (serve's continuous batching: each
    row at its own slot).
    Rows `finished` (a stop token was emitted; their output is discarded) count as exited
    from the start, so they never keep the batch from skipping a layer.

    After each exit decision one `lax.cond` asks whether every row has exited: if so, its
    skip branch only writes the K/V of all the remaining layers (and the LM head runs on
    the exit states); if not, its other branch runs the layers up to the next decision and
    holds the next conditional. On a GPU each conditional costs a launch from the host (or a
    graph node, see command_buffer_options), so a token pays one per decision it reaches,
    none before the first decision, and Full() (which never decides) none at all."""
    config = model.config
    last = config.num_layers - 1
    batch = token.shape[0]
    h = model.embed(token[:, None], position[:, None])
    cos, sin = model.rope(position[:, None])
    per_row = jnp.ndim(slot) == 1  # continuous batching (serve): each row at its own cache slot
    query_slot = slot[:, None] if per_row else slot[None, None]
    mask = attention_mask(jnp.ones((batch, 1), bool), key_valid, query_slot, jnp.arange(key_valid.shape[1])[None])
    decisions = decision_layers(config, policy)
    parts = segments(config.num_layers, decisions)

    def key_value(i, h):
        x = model.block(i).attention_input(h)
        return x, model.block(i).attn.key_value(x, cos, sin)

    def skip_rest(s, h, exited, exit_layer, exit_logits):
        """Every row has exited: the K/V of segments s.. from the exit hidden states, and the
        exit logits (the policy's own, or the head on the exit states)."""
        logits = model.exit_head_rows(h[:, 0], exit_layer) if exit_logits is None else exit_logits
        return logits, exit_layer, [key_value(i, h)[1] for part in parts[s:] for i in part]

    def run_rest(s, h, exited, exit_layer, exit_logits):
        """Segments s.. for the rows that have not exited (the others keep their hidden state)."""
        new_kv = []
        for i in parts[s]:
            x, (k, v) = key_value(i, h)
            new = model.block(i).finish(h, x, keys[i], values[i], mask, cos, sin, (k, v))
            h = jnp.where(exited[:, None, None], h, new)
            new_kv.append((k, v))
        if s == len(parts) - 1:  # after the last layer: the head, where no earlier exit gave logits
            # each row through its own exit's head (an exited row holds its exit state); Full() exits nowhere
            logits = model.shared_head(h[:, 0]) if not decisions else model.exit_head_rows(h[:, 0], exit_layer)
            if exit_logits is not None:
                logits = jnp.where(exited[:, None], exit_logits, logits)
            return logits, exit_layer, new_kv
        layer = parts[s][-1]  # every segment but the last ends at a decision
        logits = model.exit_head(h[:, 0], layer) if policy.needs_logits else None
        decide = policy.decide(layer, h[:, 0], logits) & ~exited
        exit_layer = jnp.where(decide, layer, exit_layer)
        if logits is not None:  # keep the exit's logits: the head need not run again for it
            exit_logits = logits if exit_logits is None else jnp.where(decide[:, None], logits, exit_logits)
        exited = exited | decide
        rest = (h, exited, exit_layer, exit_logits)
        if skip:
            logits, exit_layer, rest_kv = jax.lax.cond(
                jnp.all(exited), functools.partial(skip_rest, s + 1), functools.partial(run_rest, s + 1), *rest)
        else:
            logits, exit_layer, rest_kv = run_rest(s + 1, *rest)
        return logits, exit_layer, new_kv + rest_kv

    exited = jnp.zeros(batch, bool) if finished is None else finished
    logits, exit_layer, new_kv = run_rest(0, h, exited, jnp.full(batch, last, jnp.int32), None)
    # The cache is updated in place after the attention read it (see
    # models.layers.dot_product_attention); XLA must know that order, or it copies the cache.
    at = index_after(slot, logits)
    if per_row:  # one row's update per slot; XLA still updates the cache in place
        keys = tuple(_rows_update(c, k, at, 1) for c, (k, _) in zip(keys, new_kv))
        values = tuple(_rows_update(c, v, at, 2) for c, (_, v) in zip(values, new_kv))
        return logits, exit_layer, keys, values
    keys = tuple(jax.lax.dynamic_update_slice(c, k, (0, 0, at, 0)) for c, (k, _) in zip(keys, new_kv))
    values = tuple(jax.lax.dynamic_update_slice(c, v, (0, 0, 0, at)) for c, (_, v) in zip(values, new_kv))
    return logits, exit_layer, keys, values


def _rows_update(cache, new, at, axis: int):
    """cache [B, ...] with row b's `new[b]` written at index at[b] of (row) axis `axis`."""
    def one(row, update, index):
        start = [0] * row.ndim
        start[axis] = index
        return jax.lax.dynamic_update_slice(row, update, start)
    return jax.vmap(one)(cache, new, at)


# XLA's default kinds of command buffer, plus conditionals and while loops
COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"


def command_buffer_options() -> dict | None:
    """XLA options for the generation on a GPU: its decode loop and exit conditionals run as
    CUDA graphs, whose conditional nodes decide on the device, so no token and no exit
    decision waits for a device-to-host read of its predicate (H100, bf16 llama-1b shape:
    1 read per token -> 0, Full() 1.43 -> 1.30 ms/token; see the README). Only the GPU
    program (generate_jit_gpu) carries it. A setting of it in XLA_FLAGS wins (e.g. `=` to
    turn graphs off)."""
    if "xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", ""):
        return None
    return {"xla_gpu_enable_command_buffer": COMMAND_BUFFERS}


def generate_program(model, ids, valid, policy, stop_tokens, pad_token, rng, max_new_tokens, *,
                     sampling: Sampling, token_slots: int, cache_len: int, skip: bool):
    """Prefill + decode loop for up to `max_new_tokens` (traced, at most `token_slots`) tokens.
    Returns tokens [B, token_slots], exit layers [B, token_slots] (slots after a row's last
    token hold `pad_token` and -1) and lengths [B].

    On a GPU the loop is one CUDA graph, which XLA records again on the host, every call,
    when a buffer it uses has moved (CommandBufferThunk: an "update"); arguments and outputs
    get new buffers every call. So the loop touches neither: it counts `max_new_tokens` down
    in its own state, looks stop tokens up in a table built here, and leaves padding, the
    outputs and the lengths to the masking after it. Only the weights and the policy's
    numbers (kept in one buffer per value by generate) are read from arguments inside it."""
    batch, prompt_len = ids.shape
    last_hidden, keys, values = prefill(model, ids, valid, cache_len)
    is_stop = jnp.isin(jnp.arange(model.config.vocab_size), stop_tokens)  # [V]
    rng, first_key = jax.random.split(rng)
    first = choose_tokens(model.exit_head(last_hidden), sampling, first_key)
    key_valid = jnp.zeros((batch, cache_len), bool).at[:, :prompt_len].set(valid)
    init = DecodeState(
        step=jnp.int32(1), remaining=max_new_tokens - 1, token=first, position=valid.sum(1).astype(jnp.int32),
        done=is_stop[first], keys=keys, values=values, key_valid=key_valid,
        tokens=jnp.zeros((batch, token_slots), jnp.int32).at[:, 0].set(first),
        exit_layers=jnp.full((batch, token_slots), -1, jnp.int32).at[:, 0].set(model.config.num_layers - 1), rng=rng)

    def body(s: DecodeState) -> DecodeState:
        slot = prompt_len + s.step - 1  # the cache slot of s.token
        logits, exit_layer, keys, values = decode_token(
            model, policy, s.token, s.position, s.keys, s.values, s.key_valid, slot, skip, finished=s.done)
        key_valid = jax.lax.dynamic_update_slice(s.key_valid, jnp.ones((batch, 1), bool), (0, slot))
        rng, key = jax.random.split(s.rng)
        token = choose_tokens(logits, sampling, key)  # a finished row's is junk: masked below
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        exits = jax.lax.dynamic_update_slice(s.exit_layers, jnp.where(s.done, -1, exit_layer)[:, None], (0, s.step))
        done = s.done | is_stop[token]
        return DecodeState(s.step + 1, s.remaining - 1, token, s.position + 1, done, keys, values, key_valid, tokens,
                           exits, rng)

    def cond(s: DecodeState):
        return (s.remaining > 0) & ~jnp.all(s.done)

    final = jax.lax.while_loop(cond, body, init)
    # Every token up to a row's stop (included) has an exit layer. These are new buffers, so the
    # outputs are written here, after the loop, not by it.
    generated = final.exit_layers >= 0
    return (jnp.where(generated, final.tokens, pad_token), jnp.where(generated, final.exit_layers, -1),
            generated.sum(1, dtype=jnp.int32))


# The model goes in as a pytree, not as nnx.split's (graphdef, state): nnx.split and the
# graphdef's hash took 5.5 ms of host time per call for a 16-layer model on a 2-core CPU,
# more than four tokens of llama-1b decoding on an H100; jax flattens the module in 0.6 ms.
STATIC_ARGNAMES = ("sampling", "token_slots", "cache_len", "skip")
generate_jit = jax.jit(generate_program, static_argnames=STATIC_ARGNAMES)
# The GPU's: the option is for XLA:GPU only, and a TPU's compiler need not accept it.
generate_jit_gpu = jax.jit(generate_program, static_argnames=STATIC_ARGNAMES,
                           compiler_options=command_buffer_options())
