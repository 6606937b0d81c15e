"""Aligned host buffers that one tensor at a time is read into, then copied to JAX.

Each parameter is read into its own buffer, copied into memory XLA owns, and the buffer is
freed before the next one: an import holds the weights once plus one tensor. bf16 has no
NumPy dtype code, so it is staged as uint16 and bit-cast.

Handing XLA the buffer itself (DLPack, zero-copy) saved that one tensor but left XLA holding
memory whose release calls back into Python; released on an XLA worker thread while the
interpreter shut down, it aborted the process ("terminate called without an active exception").
"""

from __future__ import annotations

import jax
import numpy as np


def host_buffer(shape, dtype):
    """An uninitialised host buffer; returns (buffer, view in `dtype` for filling)."""
    dtype = np.dtype(dtype)
    buffer = np.empty(shape, np.uint16 if dtype.name == "bfloat16" else dtype)
    return buffer, buffer.view(dtype)


def to_jax(buffer: np.ndarray, dtype) -> jax.Array:
    """A copy of a `host_buffer` in memory JAX owns (the buffer can be freed right after)."""
    dtype = np.dtype(dtype)
    array = jax.device_put(buffer, may_alias=False)
    if dtype.name == "bfloat16":
        array = jax.lax.bitcast_convert_type(array, dtype)
    return jax.block_until_ready(array)
