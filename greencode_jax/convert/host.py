"""Host buffers that JAX can adopt without a copy.

On the CPU backend an aligned NumPy buffer is handed to JAX through DLPack, which
aliases its memory: an import then holds one copy of the weights, not two. bf16
has no DLPack code, so it is staged as uint16 and bit-cast (one parameter's copy).
Other backends copy to the device and the host buffer is freed right after.
"""

from __future__ import annotations

import jax
import numpy as np

ALIGNMENT = 64  # XLA's CPU client adopts external buffers aligned to this


def host_buffer(shape, dtype):
    """An uninitialised, aligned host buffer; returns (buffer, view in `dtype` for filling)."""
    dtype = np.dtype(dtype)
    storage = np.uint16 if dtype.name == "bfloat16" else dtype
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    buffer = raw[offset:offset + nbytes].view(storage).reshape(shape)
    return buffer, buffer.view(dtype)


def to_jax(buffer: np.ndarray, dtype) -> jax.Array:
    """Hands a `host_buffer` to JAX (zero-copy on CPU where the dtype allows)."""
    dtype = np.dtype(dtype)
    if jax.default_backend() != "cpu":
        return jax.device_put(buffer.view(dtype))
    array = jax.dlpack.from_dlpack(buffer)
    if dtype.name == "bfloat16":
        array = jax.lax.bitcast_convert_type(array, dtype)
    return array
