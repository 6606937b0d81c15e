"""Exit heads: a small trainable map per exit, applied to the exit layer's hidden state before the
model's own final norm and LM head (a tuned lens, trained on a frozen backbone).

    affine:  h' = h + h A_i + b_i                 A_i [E, E], b_i [E], both zero at first
    lowrank: h' = h + (h D_i) U_i + b_i            D_i [E, r] random, U_i [r, E] and b_i zero at first

Zero-initialised, so an untrained head is exactly the plain exit. Every exit but the last layer
has one; the last layer's output is the model's own and never changes. Heads are stacked, one
slot per head layer in `config.exit_layers` order, so generation can pick each row's head by its
exit layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from greencode_jax.models.config import HEAD_KINDS, ModelConfig  # noqa: F401 (HEAD_KINDS re-exported)


def head_layers(config: ModelConfig) -> tuple[int, ...]:
    """The exit layers that carry a head: every exit but the last layer."""
    return tuple(e for e in config.exit_layers if e < config.num_layers - 1) if config.exit_head else ()


class ExitHeads(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.head_layers = head_layers(config)
        n, e, r = len(self.head_layers), config.hidden_size, config.exit_head_rank
        self.kind = config.exit_head
        self.bias = nnx.Param(jnp.zeros((n, e), dtype))
        if self.kind == "affine":
            self.weight = nnx.Param(jnp.zeros((n, e, e), dtype))
        else:
            self.down = nnx.Param(jax.random.normal(rngs.params(), (n, e, r), dtype) / jnp.sqrt(e).astype(dtype))
            self.up = nnx.Param(jnp.zeros((n, r, e), dtype))

    def slot(self, layer: int) -> int | None:
        return self.head_layers.index(layer) if layer in self.head_layers else None

    def _delta(self, h, index):
        """h A + b (or h D U + b) with the parameters of slot(s) `index` (an int, or per-row ints
        broadcast against h's leading axis)."""
        dtype = self.bias.dtype
        x = h.astype(dtype)
        if self.kind == "affine":
            weight = self.weight[...][index]
            delta = jnp.einsum("...e,...ef->...f", x, weight) if weight.ndim > 2 else x @ weight
        else:
            down, up = self.down[...][index], self.up[...][index]
            if down.ndim > 2:
                delta = jnp.einsum("...r,...rf->...f", jnp.einsum("...e,...er->...r", x, down), up)
            else:
                delta = (x @ down) @ up
        return delta + self.bias[...][index]

    def at_layer(self, h, layer: int):
        """h [..., E] through the head of exit `layer` (a Python int); unchanged where it has none."""
        index = self.slot(layer)
        return h if index is None else (h + self._delta(h, index).astype(h.dtype))

    def per_row(self, h, exit_layers):
        """h [B, E] through each row's head, chosen by its exit layer [B] (traced); rows whose layer
        has no head (the last layer) keep h exactly."""
        table = jnp.full((max(self.head_layers, default=0) + 1,), -1, jnp.int32)
        table = table.at[jnp.asarray(self.head_layers, jnp.int32)].set(jnp.arange(len(self.head_layers), dtype=jnp.int32))
        index = jnp.where(exit_layers < table.shape[0], table[jnp.minimum(exit_layers, table.shape[0] - 1)], -1)
        adapted = h + self._delta(h, jnp.maximum(index, 0)).astype(h.dtype)
        return jnp.where((index >= 0)[:, None], adapted, h)

    def stacked(self, hs, layers):
        """hs [X, ..., E], one slice per exit layer in `layers`: each through its own head."""
        slots = [self.slot(layer) for layer in layers]
        out = [h if s is None else h + self._delta(h, s).astype(h.dtype) for h, s in zip(hs, slots)]
        return jnp.stack(out)
