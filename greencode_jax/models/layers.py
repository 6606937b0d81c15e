"""Building blocks shared by OPT and Llama: norms, rotary embeddings, attention, MLPs.

Norms, softmax and rotary angles are computed in float32 whatever the parameter
dtype, as the precision convention of docs/architecture.md asks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from greencode_jax.models.config import ModelConfig

ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def normal_init(std=0.02):
    return nnx.initializers.normal(std)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm, in float32; `affine=False` has neither scale nor bias."""

    def __init__(self, dim: int, eps: float, affine: bool = True, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if affine else None

    def __call__(self, x):
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (HF's order of operations)."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, with `linear` or `llama3` scaling (HF's formulas)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling.factor)
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(inv_freq, positions):
    """cos and sin of the rotary angles, [B, T, head_dim], in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """HF's `rotate_half` convention, so Llama q/k weights need no permutation. x: [B, T, H, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_mask(query_valid, key_valid, query_positions=None, key_positions=None):
    """Boolean mask [B, T, S]: causal by index, and keys that are padding are hidden.

    `query_valid` / `key_valid` are [B, T] / [B, S] booleans. Positions default to
    indices; a KV-cached step passes the cache slots' indices.
    """
    t, s = query_valid.shape[1], key_valid.shape[1]
    qi = jnp.arange(t)[None, :] if query_positions is None else query_positions
    ki = jnp.arange(s)[None, :] if key_positions is None else key_positions
    causal = ki[:, None, :] <= qi[:, :, None]
    return causal & key_valid[:, None, :]


ATTENTION_QUERY_BLOCK = 64


def dot_product_attention(q, k, v, mask, scale, new_kv=None):
    """Grouped-query attention. q [B,T,N,D], k [B,K,S,D], v [B,K,D,S], mask [B,T,S] -> [B,T,N*D].

    K and V are laid out as the KV cache stores them, each as its matmul reads it
    (free dimension before the contracted one), so a decode step never transposes a
    layer's cache: that copy cost 2 % of a token's memory traffic on CPU. Scores and
    softmax in float32. Fully masked rows (queries that are padding) get uniform weights
    instead of NaN, as HF's finite mask value gives.

    When the queries are the keys' own positions (T == S: prefill and training), the mask
    is causal by index (`attention_mask`), so a block of queries never sees the keys after
    its last one: queries go in blocks of ATTENTION_QUERY_BLOCK over only the keys they can
    see, which halves the work at 512 tokens (13 -> 7 ms per OPT-125m layer on CPU).

    `new_kv` (K [B,K,T,D], V [B,K,D,T]) are the queries' own tokens, attended causally
    besides `k`/`v`: a decode step reads the cache as it was and writes the new token's
    K/V into it afterwards. Writing first made XLA copy each layer's whole cache every
    step (the in-place update got fused into both the attention and the loop carry).
    """
    t, s = q.shape[1], k.shape[2]
    if new_kv is not None or t != s or t <= ATTENTION_QUERY_BLOCK:
        return _attention(q, k, v, mask, scale, new_kv)
    blocks = []
    for start in range(0, t, ATTENTION_QUERY_BLOCK):
        end = min(t, start + ATTENTION_QUERY_BLOCK)
        blocks.append(_attention(q[:, start:end], k[:, :, :end], v[:, :, :, :end], mask[:, start:end, :end], scale))
    return jnp.concatenate(blocks, axis=1)


def _attention(q, k, v, mask, scale, new_kv=None):
    b, t, n, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, d)

    def masked_scores(keys, mask):  # [B, K, G, T, S] float32
        scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
        if scale != 1.0:
            scores = scores * scale
        return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)

    scores = masked_scores(k, mask[:, None, None, :, :])
    if new_kv is not None:
        scores = jnp.concatenate([scores, masked_scores(new_kv[0], jnp.tri(t, dtype=bool))], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", probs[..., :k.shape[2]], v)
    if new_kv is not None:
        out = out + jnp.einsum("bkgts,bkds->btkgd", probs[..., k.shape[2]:], new_kv[1])
    return out.reshape(b, t, n * d)


@jax.custom_vjp
def dense(x, kernel):
    """x [..., in] times a kernel stored [out, in], PyTorch's layout.

    At batch 1 a decode step is one matrix-vector product per weight, bound by reading the
    weights. XLA:CPU streams an [out, in] matrix ~15 % faster than an [in, out] one (each
    output is a dot product over a contiguous row), and HF checkpoints need no transpose."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))


def _dense_fwd(x, kernel):
    return dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, dy):
    x, kernel = residuals
    # The kernel's gradient contracts every token: written as (x^T @ dy)^T over [tokens,
    # features] views, XLA:CPU transposes the input side and then the (weight-sized) result.
    # Left to autodiff it transposed dy inside the elementwise fusion that made it (a SwiGLU
    # backward: 35 ms per layer for 4 MB).
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_dy = dy.reshape(-1, dy.shape[-1])
    return jnp.matmul(dy, kernel), jnp.matmul(tokens_x.T, tokens_dy).T.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
    """torch.nn.Linear: `kernel` [out, in] (and `bias` [out]), computed in the parameters' dtype."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init()(rngs.params(), (d_out, d_in), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        kernel = self.kernel[...]
        y = dense(x.astype(kernel.dtype), kernel)
        return y if self.bias is None else y + self.bias[...]


class Attention(nnx.Module):
    """Multi-head attention with grouped K/V heads; RoPE when `rotary` (Llama)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.rotary = c.family == "llama"
        # OPT scales the query after its projection (bias included); Llama scales the scores.
        self.scale_query = c.family == "opt"
        bias = c.attention_bias
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias, dtype, rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias, dtype, rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias, dtype, rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias, dtype, rngs)

    def key_value(self, x, cos=None, sin=None):
        """K [B, K, T, D] and V [B, K, D, T] of `x` (the cache's layout), K rotated for Llama.

        A skipped layer needs only this."""
        b, t, _ = x.shape
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.rotary:
            k = apply_rope(k, cos, sin)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)

    def query(self, x, cos=None, sin=None):
        b, t, _ = x.shape
        q = self.q_proj(x)
        if self.scale_query:
            q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        if self.rotary:
            q = apply_rope(q, cos, sin)
        return q

    def attend(self, x, keys, values, mask, cos=None, sin=None, new_kv=None):
        """Output projection of `x`'s queries attending over `keys` [B, K, S, D] and `values` [B, K, D, S]
        (and `new_kv`, their own K/V: see `dot_product_attention`)."""
        scale = 1.0 if self.scale_query else self.head_dim ** -0.5
        return self.o_proj(dot_product_attention(self.query(x, cos, sin), keys, values, mask, scale, new_kv))

    def __call__(self, x, mask, cos=None, sin=None):
        return self.attend(x, *self.key_value(x, cos, sin), mask, cos, sin)


class OPTMLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.act = ACTIVATION_FNS[c.activation]
        self.fc1 = Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nnx.Module):
    """Llama's SwiGLU MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.act = ACTIVATION_FNS[c.activation]
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
