"""Each host feeds only its shard: this process's rows of every global batch become one
global array sharded over the mesh (`jax.make_array_from_process_local_data`)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from greencode_jax.parallel import logical_sharding


class BatchFeeder:
    def __init__(self, mesh: Mesh, grad_accum: int, batch_size: int, seq_len: int):
        self.mesh = mesh
        self.shape = (grad_accum, batch_size, seq_len)  # [micro-batches, sequences, tokens] of one update
        self.tokens_sharding = logical_sharding(("micro", "batch", "length"), self.shape, mesh)
        self.flags_sharding = logical_sharding(("batch",), (mesh.size,), mesh)

    def tokens(self, local_rows: np.ndarray) -> jax.Array:
        """This process's [grad_accum * batch_size / P, T] rows -> the global [grad_accum, batch_size, T] array.

        Micro-batch a takes rows a*b .. (a+1)*b - 1 of every process's share (b = its rows per
        micro-batch); the update averages all micro-batches, so which rows share one does not matter."""
        accum = self.shape[0]
        local = local_rows.reshape(accum, local_rows.shape[0] // accum, local_rows.shape[1])
        return jax.make_array_from_process_local_data(self.tokens_sharding, local, self.shape)

    def stop_flags(self, stop: bool) -> jax.Array:
        """This process's "stop requested" bit on each of its devices, as one global [devices] array."""
        local = np.full((len(self.mesh.local_devices),), stop, bool)
        return jax.make_array_from_process_local_data(self.flags_sharding, local, (self.mesh.size,))
