"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from greencode_jax.errors import GreencodeError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """`temperature=0` is greedy. `top_k=0` and `top_p=1` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GreencodeError(f"sampling temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise GreencodeError(f"sampling top_k {self.top_k}: must be >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            raise GreencodeError(f"sampling top_p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def choose_tokens(logits, sampling: Sampling, key):
    """logits [B, V] float32 -> token ids [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        logits = _top_p_filter(logits, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _top_p_filter(logits, top_p):
    """logits [B, V] with every token outside the nucleus of mass `top_p` (a number or [B, 1]) masked."""
    neg = jnp.finfo(logits.dtype).min
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the top token always stays)
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    return jnp.where(logits < cutoff, neg, logits)


def choose_tokens_per_row(logits, temperature, top_p, keys):
    """logits [B, V] -> token ids [B] int32, each row with its own temperature [B] (0: greedy, the
    argmax choose_tokens takes), top_p [B] and PRNG key [B] (serve: one request per row). The
    sampling path (a sort of the vocabulary per row) runs only when some row samples: on a CPU it
    cost more than the decode step's matmuls for an all-greedy batch."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = _top_p_filter(scaled, top_p[:, None])
        sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)
