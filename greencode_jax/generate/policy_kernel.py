"""The `Learned` policy's P(exit) as two fused kernels (Pallas, Triton backend).

On a GPU at batch 1 a decode step is a chain of small kernels, and XLA gives the policy's
MLP several of its own (the normalised first layer, each further layer, the softmax): about
10 µs per decision on an H200, whatever the MLP's form. These kernels do the whole MLP in
two launches. The first reads the first layer's weights (E x 64 floats, 512 KB for E = 2048)
in chunks, one program per (row, chunk), so many SMs share the read: at batch 1 a single
program would stream it through one SM. The second adds the chunks' partial sums in a fixed
order (no atomics: the same result every run), runs the small layers, and returns
sigmoid(logit_exit - logit_continue), which is the softmax's P(exit).

Off a GPU the kernels run in Pallas' interpret mode: the same arithmetic through XLA, for
tests, not for speed. Triton needs every in-kernel array to have a power-of-two size, so the
MLP's widths must be powers of two (GREEN-CODE's actor is [64, 64]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from greencode_jax.errors import GreencodeError

CHUNK_ELEMENTS = 8192  # first-layer weights one program reads: [chunk, width], 32 KB in fp32
NUM_WARPS = 4


def unsupported_reason(params, backend: str | None = None) -> str | None:
    """Why these actor params (on JAX's `backend`, if given) cannot take the fused kernels, or None."""
    if backend == "tpu":
        return "the fused kernels are written for GPUs (Triton); on a TPU XLA's own kernels are the choice"
    layers = params["layers"]
    widths = [layer["w"].shape[1] for layer in layers[:-1]]
    if not widths:
        return "the MLP has no hidden layer"
    if any(w & (w - 1) for w in widths):
        return f"hidden widths {widths} are not all powers of two (Triton's rule)"
    if layers[-1]["w"].shape[1] != 2:
        return f"the last layer has {layers[-1]['w'].shape[1]} outputs, not 2 (continue, exit)"
    return None


def check_supported(params, backend: str | None = None):
    """One clear error where `unsupported_reason` finds one."""
    reason = unsupported_reason(params, backend)
    if reason:
        raise GreencodeError(f"Learned(kernel='pallas'): {reason}; use kernel='xla'")


def chunk_size(hidden_size: int, width: int) -> int:
    """The largest power of two that divides hidden_size, capped so a [chunk, width] tile stays small."""
    return min(hidden_size & -hidden_size, max(1, CHUNK_ELEMENTS // width))


def fused_exit_probability(params, hidden):
    """P(exit) float32 for hidden states [..., E]: the Learned MLP in two kernel launches."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    check_supported(params)
    lead, hidden_size = hidden.shape[:-1], hidden.shape[-1]
    hidden = hidden.reshape(-1, hidden_size)
    batch = hidden.shape[0]
    layers = params["layers"]
    width = layers[0]["w"].shape[1]
    chunk = chunk_size(hidden_size, width)
    parts = hidden_size // chunk
    # The second kernel reads all partial sums in one [slots, width] load, and Triton's sizes
    # are powers of two: programs past the last chunk write zeros (E = 2560: 20 chunks, 32 slots).
    slots = 1 << (parts - 1).bit_length()

    def first_layer_part(hidden_ref, mean_ref, std_ref, w_ref, out_ref):
        """Program (row, slot): the first layer's sum over one chunk of the hidden state."""
        row, slot = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(pl.multiple_of(jnp.minimum(slot, parts - 1) * chunk, chunk), chunk)
        x = (hidden_ref[row, cols].astype(jnp.float32) - mean_ref[cols]) / std_ref[cols]
        out_ref[row, slot, :] = jnp.where(slot < parts, jnp.sum(x[:, None] * w_ref[cols, :], axis=0), 0.0)

    def rest(partial_ref, *refs):
        """Program row: the partial sums added up, then the small layers and P(exit)."""
        *layer_refs, out_ref = refs
        weights, biases = layer_refs[0::2], layer_refs[1::2]
        row = pl.program_id(0)
        x = jnp.tanh(jnp.sum(partial_ref[row, :, :], axis=0) + biases[0][...])
        for w, b in zip(weights[1:-1], biases[1:-1]):
            x = jnp.tanh(jnp.sum(x[:, None] * w[...], axis=0) + b[...])
        # softmax over (continue, exit) at index 1 is the sigmoid of the logits' difference
        w, b = weights[-1], biases[-1]
        margin = jnp.sum(x * (w[:, 1] - w[:, 0])) + (b[1] - b[0])
        out_ref[row] = 1 / (1 + jnp.exp(-margin))

    def run(interpret: bool, hidden, mean, std, *flat):
        options = dict(compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
                       interpret=interpret)
        partial = pl.pallas_call(
            first_layer_part, out_shape=jax.ShapeDtypeStruct((batch, slots, width), jnp.float32),
            grid=(batch, slots), name="learned_first_layer", **options)(hidden, mean, std, flat[0])
        return pl.pallas_call(
            rest, out_shape=jax.ShapeDtypeStruct((batch,), jnp.float32), grid=(batch,),
            name="learned_exit_probability", **options)(partial, *flat)

    args = (hidden, params["obs_mean"], params["obs_std"], *(a for layer in layers for a in (layer["w"], layer["b"])))
    # chosen when lowering for a platform (not by the default backend), so lowering for a GPU
    # from a CPU host compiles the Triton kernels
    return jax.lax.platform_dependent(
        *args, cuda=functools.partial(run, False), rocm=functools.partial(run, False),
        default=functools.partial(run, True)).reshape(lead)
