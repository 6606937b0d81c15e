"""The device side of continuous batching (JetStream's shape): fixed slots, each with its own
KV-cache row; `admit` prefills one request into a slot, `step` decodes every slot a few tokens.

Both run generate's own pieces: `admit` is `generate.decode.prefill` plus the first token as
generate chooses it, `step` loops `generate.decode.decode_token` with a [slots] vector of cache
slots and a `PerRow` policy, so each slot exits on its own. A prompt is left-padded to a
multiple of PROMPT_BUCKET, as generate pads it: one compile of `admit` per bucket, and the
cache layout (and so the arithmetic) of a slot is that of generate run alone.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from greencode_jax.generate.decode import decode_token, prefill
from greencode_jax.generate.sampling import choose_tokens_per_row

TOP_LOGPROBS = 5  # the most alternatives a reply's logprobs may ask for (OpenAI's limit)


class Slots(NamedTuple):
    """Every slot's decoding state on the device."""

    keys: tuple  # per layer [S, K, C, D]
    values: tuple  # per layer [S, K, D, C]
    key_valid: jax.Array  # [S, C] bool
    token: jax.Array  # [S] the last token, input of the next step
    position: jax.Array  # [S] its position id
    cache_slot: jax.Array  # [S] the cache index its K/V go to
    rng: jax.Array  # [S] PRNG keys


class Settings(NamedTuple):
    """Per-slot request settings, traced (changing them never recompiles)."""

    policy: object  # generate.row_policy.PerRow
    temperature: jax.Array  # [S] float32, 0: greedy
    top_p: jax.Array  # [S] float32
    active: jax.Array  # [S] bool: the slot holds a request
    alternatives: jax.Array  # bool: some request asked for top logprobs (else they are not computed)


class StepOutput(NamedTuple):
    tokens: jax.Array  # [S, T]
    exit_layers: jax.Array  # [S, T]
    logprobs: jax.Array  # [S, T] of the chosen token
    top_ids: jax.Array  # [S, T, TOP_LOGPROBS]
    top_logprobs: jax.Array  # [S, T, TOP_LOGPROBS]


def empty_slots(model, slots: int, cache_len: int) -> Slots:
    c = model.config
    dtype = model.embed_tokens.dtype  # the compute dtype: what prefill's K/V come in
    keys = tuple(jnp.zeros((slots, c.num_kv_heads, cache_len, c.head_dim), dtype) for _ in range(c.num_layers))
    values = tuple(jnp.zeros((slots, c.num_kv_heads, c.head_dim, cache_len), dtype) for _ in range(c.num_layers))
    # one buffer each: the slots are donated, and a buffer donated twice is refused
    state = Slots(keys, values, jnp.zeros((slots, cache_len), bool), *(jnp.zeros(slots, jnp.int32) for _ in range(3)),
                  jax.random.split(jax.random.key(0), slots))
    # committed to the device, as the step's outputs are: else the second step compiles again
    return jax.device_put(state, jax.local_devices()[0])


def _token_logprobs(logits, tokens, alternatives):
    """The chosen tokens' log-probabilities [B], and the top TOP_LOGPROBS alternatives (ids and
    log-probabilities [B, TOP_LOGPROBS]) only when `alternatives`: a top-k over the vocabulary per
    row and token costs as much as a small model's decode step on a CPU."""
    logits = logits.astype(jnp.float32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normaliser

    def top():
        top_logits, top_ids = jax.lax.top_k(logits, TOP_LOGPROBS)
        return top_ids.astype(jnp.int32), top_logits - normaliser[:, None]

    shape = (logits.shape[0], TOP_LOGPROBS)
    none = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32))
    return (chosen, *jax.lax.cond(alternatives, top, lambda: none))


def admit_program(model, slots: Slots, ids, valid, slot, temperature, top_p, rng, alternatives):
    """Prefills one prompt (ids, valid [1, P]) into slot `slot` and chooses its first token as
    generate does (the last layer's head). Returns the slots and the first token's StepOutput row."""
    cache_len = slots.key_valid.shape[1]
    last_hidden, keys, values = prefill(model, ids, valid, cache_len)
    rng, first_key = jax.random.split(rng)
    logits = model.exit_head(last_hidden)
    first = choose_tokens_per_row(logits, temperature[None], top_p[None], first_key[None])
    logprob, top_ids, top_logprobs = _token_logprobs(logits, first, alternatives)
    prompt_len = ids.shape[1]
    row_valid = jnp.zeros(cache_len, bool).at[:prompt_len].set(valid[0])
    slots = Slots(
        tuple(c.at[slot].set(k[0]) for c, k in zip(slots.keys, keys)),
        tuple(c.at[slot].set(v[0]) for c, v in zip(slots.values, values)),
        slots.key_valid.at[slot].set(row_valid), slots.token.at[slot].set(first[0]),
        slots.position.at[slot].set(valid.sum(dtype=jnp.int32)), slots.cache_slot.at[slot].set(prompt_len),
        slots.rng.at[slot].set(rng))
    out = StepOutput(first[:, None], jnp.full((1, 1), model.config.num_layers - 1, jnp.int32), logprob[:, None],
                     top_ids[:, None], top_logprobs[:, None])
    return slots, out


def step_program(model, slots: Slots, settings: Settings, is_stop, rows, *, tokens: int):
    """`tokens` decode steps of the slots `rows` [A] (the active ones, padded with free ones to a
    bucket of A, so idle slots cost nothing: on a CPU a step's time grows with its rows). A slot
    that is inactive, or emitted a stop token earlier in this call, counts as exited (never keeps
    the others from skipping a layer); its outputs are junk the engine drops. Only active slots
    advance their cache index. Returns the slots and a StepOutput of A rows, in `rows` order."""
    part = jax.tree.map(lambda x: x[rows], slots)
    policy = settings.policy
    policy = type(policy)(policy.kinds[rows], policy.thresholds[rows], policy.layers[rows], policy.params,
                          needs_logits=policy.needs_logits)
    settings = Settings(policy, settings.temperature[rows], settings.top_p[rows], settings.active[rows],
                        settings.alternatives)
    index = jnp.arange(rows.shape[0])

    def one(carry, _):
        s, done = carry
        logits, exit_layer, keys, values = decode_token(
            model, settings.policy, s.token, s.position, s.keys, s.values, s.key_valid, s.cache_slot, True,
            finished=done)
        split = jax.vmap(jax.random.split)(s.rng)
        token = choose_tokens_per_row(logits, settings.temperature, settings.top_p, split[:, 1])
        logprob, top_ids, top_logprobs = _token_logprobs(logits, token, settings.alternatives)
        key_valid = s.key_valid.at[index, s.cache_slot].set(s.key_valid[index, s.cache_slot] | settings.active)
        advance = settings.active.astype(jnp.int32)
        s = Slots(keys, values, key_valid, token, s.position + advance, s.cache_slot + advance, split[:, 0])
        return (s, done | is_stop[token]), StepOutput(token, exit_layer, logprob, top_ids, top_logprobs)

    (part, _), out = jax.lax.scan(one, (part, ~settings.active), None, length=tokens)
    slots = jax.tree.map(lambda whole, new: whole.at[rows].set(new), slots, part)
    return slots, StepOutput(*(jnp.moveaxis(x, 0, 1) for x in out))


# The model goes in as a pytree, as generate_jit takes it; the slots are donated (updated in place).
admit_jit = jax.jit(admit_program, donate_argnames=("slots",))
step_jit = jax.jit(step_program, static_argnames=("tokens",), donate_argnames=("slots",))
