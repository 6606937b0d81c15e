"""`EarlyExitLM`: OPT or Llama as a Flax NNX module with an exit head usable after any layer.

Exit i decodes decoder layer i's output through the model's own final norm, OPT's
`project_out` when present, and the LM head (GREEN-CODE adds no heads of its own).
Decoder layers are stored stacked (one leading axis of size `num_layers`) so the
forward is a `lax.scan` that compiles one layer, and so a layer's parameters can be
sliced out for the KV-cached decode step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from greencode_jax.errors import GreencodeError
from greencode_jax.models.config import ModelConfig
from greencode_jax.models.heads import ExitHeads
from greencode_jax.models.layers import (
    Attention, GatedMLP, LayerNorm, Linear, OPTMLP, RMSNorm, attention_mask, normal_init, rope_cos_sin,
    rope_inv_freq,
)

OPT_POSITION_OFFSET = 2  # OPT's learned positions start at index 2 (fairseq legacy)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, eq=False)
class Origin:
    """The directory a model's weights were loaded from (None: built here): its tokenizer
    files travel with the weights when they are saved or exported.

    Every Origin compares equal to every other. A model's static attributes are part of its
    pytree structure and so of every jit cache key it enters; the path changes nothing in a
    compiled program, so two copies of a checkpoint in two directories (an ablation's
    checkpoints, say) must share their compilations.

    `fingerprint` is the weights' fingerprint (`convert.fingerprint.model_fingerprint`) as the
    checkpoint recorded it, or as computed on first use; None until then."""

    path: str | None = None
    fingerprint: str | None = None

    def __eq__(self, other):
        return isinstance(other, Origin)

    def __hash__(self):
        return hash(Origin)


def param_arrays(*modules) -> list:
    """The parameter arrays of `modules`, for counting weights and the bytes they hold."""
    return [x for module in modules for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GreencodeError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


class DecoderBlock(nnx.Module):
    """One decoder layer. Pre-norm (Llama, most OPT) or post-norm (opt-350m)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        if c.family == "llama":
            self.attn_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype)
            self.mlp_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype)
            self.mlp = GatedMLP(c, dtype, rngs)
        else:
            self.attn_norm = LayerNorm(c.hidden_size, c.norm_eps, c.layer_norm_affine, dtype)
            self.mlp_norm = LayerNorm(c.hidden_size, c.norm_eps, c.layer_norm_affine, dtype)
            self.mlp = OPTMLP(c, dtype, rngs)
        self.attn = Attention(c, dtype, rngs)
        self.pre_norm = c.family == "llama" or c.pre_layer_norm

    def attention_input(self, h):
        """What this layer's attention projects: its K/V for a skipped layer come from here."""
        return self.attn_norm(h) if self.pre_norm else h

    def __call__(self, h, mask, cos=None, sin=None):
        x = self.attention_input(h)
        keys, values = self.attn.key_value(x, cos, sin)
        return self.finish(h, x, keys, values, mask, cos, sin)

    def finish(self, h, x, keys, values, mask, cos=None, sin=None, new_kv=None):
        """The layer after its K/V projection: attention of `x`'s queries over `keys`/`values`
        (this sequence's, or a KV cache's), the residuals and the MLP. A skipped layer stops
        before this."""
        attended = self.attn.attend(x, keys, values, mask, cos, sin, new_kv)
        if self.pre_norm:
            h = h + attended
            return h + self.mlp(self.mlp_norm(h))
        h = self.attn_norm(h + attended)
        return self.mlp_norm(h + self.mlp(h))


class ForwardOutput(NamedTuple):
    """The training forward's result. `exit_*` are stacked in `config.exit_layers` order."""

    logits: jax.Array  # [B, T, V] float32, final layer
    exit_logits: jax.Array  # [n_exits, B, T, V] float32 (the last entry is the final layer)
    exit_hidden: jax.Array  # [n_exits, B, T, H], decoder-layer outputs before the exit head (and exit heads)


class EarlyExitLM(nnx.Module):
    """A decoder-only LM whose every configured exit layer can produce logits."""

    def __init__(self, config: ModelConfig, dtype="float32", *, rngs: nnx.Rngs):
        c = self.config = config
        self.origin = Origin()
        dtype = self.dtype = resolve_dtype(dtype)
        embed_dim = c.word_embed_dim
        self.embed_tokens = nnx.Embed(c.vocab_size, embed_dim, dtype=dtype, param_dtype=dtype,
                                      embedding_init=normal_init(), rngs=rngs)
        self.embed_positions = nnx.Embed(
            c.max_position_embeddings + OPT_POSITION_OFFSET, c.hidden_size, dtype=dtype, param_dtype=dtype,
            embedding_init=normal_init(), rngs=rngs) if c.family == "opt" else None
        self.project_in = Linear(embed_dim, c.hidden_size, False, dtype, rngs) if c.has_projection else None
        self.project_out = Linear(c.hidden_size, embed_dim, False, dtype, rngs) if c.has_projection else None

        if c.scan_layers:
            @nnx.split_rngs(splits=c.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked_blocks(rngs):
                return DecoderBlock(c, dtype, rngs)

            self.layers = stacked_blocks(rngs)
        else:
            self.layers = nnx.List([DecoderBlock(c, dtype, rngs) for _ in range(c.num_layers)])
        if not c.has_final_norm:
            self.final_norm = None
        elif c.family == "llama":
            self.final_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype)
        else:
            self.final_norm = LayerNorm(c.hidden_size, c.norm_eps, c.layer_norm_affine, dtype)
        self.lm_head = None if c.tie_word_embeddings else Linear(embed_dim, c.vocab_size, False, dtype, rngs)
        self.exit_heads = nnx.data(ExitHeads(c, dtype, rngs) if c.exit_head else None)  # attachable later

    # ---- pieces ------------------------------------------------------------------
    def positions(self, valid):
        """Positions from the attention mask, so left padding works (padding gets -1)."""
        return jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, -1)

    def embed(self, input_ids, positions):
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        if self.embed_positions is not None:
            h = h + self.embed_positions(positions + OPT_POSITION_OFFSET)
        return h

    def rope(self, positions):
        if self.config.family != "llama":
            return None, None
        return rope_cos_sin(rope_inv_freq(self.config), positions)

    def exit_head_modules(self) -> list:
        """The modules `exit_head` reads: final norm, OPT's project_out, and the LM head (the
        embedding when tied)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return [m for m in (self.final_norm, self.project_out, head) if m is not None]

    def exit_head(self, h, layer: int | None = None):
        """Exit `layer`'s head when the model has exit heads (models/heads.py), then the final
        norm, OPT's project_out and the LM head, shared by every exit. float32 logits."""
        if layer is not None and self.exit_heads is not None:
            h = self.exit_heads.at_layer(h, layer)
        return self.shared_head(h)

    def exit_head_rows(self, h, exit_layers):
        """`exit_head` of h [B, E] with each row's own exit layer [B] (traced): generation's last step."""
        if self.exit_heads is not None:
            h = self.exit_heads.per_row(h, exit_layers)
        return self.shared_head(h)

    def through_heads(self, exit_hidden):
        """exit_hidden [n_exits, ...] (in `config.exit_layers` order), each through its exit head."""
        return self.through_heads_of(exit_hidden, self.config.exit_layers)

    def through_heads_of(self, hidden, layers):
        """hidden [len(layers), ...], slice i through the exit head of layer layers[i]."""
        if self.exit_heads is None:
            return hidden
        return self.exit_heads.stacked(hidden, layers)

    def shared_head(self, h):
        """Final norm, OPT's project_out, LM head: the part every exit shares. float32 logits."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        # Tied head: contract with the embedding [V, E] as it is stored. `embedding.T @`
        # would make XLA copy the whole transposed matrix on every call (every token).
        embedding = self.embed_tokens.embedding[...]
        logits = jax.lax.dot_general(h.astype(embedding.dtype), embedding, (((h.ndim - 1,), (1,)), ((), ())))
        return logits.astype(jnp.float32)

    def block(self, index: int) -> DecoderBlock:
        """Decoder layer `index` as its own module."""
        if not self.config.scan_layers:
            return self.layers[index]
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))

    def run_layers(self, h, mask, cos, sin, num_layers: int, collect: bool):
        """Runs decoder layers 0..num_layers-1; with `collect`, also returns every layer's output."""

        def body(graphdef, h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h, mask, cos, sin)
            return h, (h if collect else None)

        if self.config.remat:
            body = jax.checkpoint(body, static_argnums=(0,), prevent_cse=not self.config.scan_layers)
        if self.config.scan_layers:
            graphdef, state = nnx.split(self.layers)
            if num_layers < self.config.num_layers:
                state = jax.tree.map(lambda x: x[:num_layers], state)
            return jax.lax.scan(functools.partial(body, graphdef), h, state)
        outputs = []
        for block in self.layers[:num_layers]:
            h, out = body(*nnx.split(block)[:1], h, nnx.state(block))
            outputs.append(out)
        return h, (jnp.stack(outputs) if collect else None)

    def set_scan_layers(self, scan: bool) -> "EarlyExitLM":
        """Converts the layer storage in place, one parameter at a time.

        Stacked (`scan=True`): one array per parameter with a leading layer axis, for a
        scanned training forward that compiles one layer. Per-layer (`scan=False`): one
        array per layer, which decoding needs: slicing a layer out of a stacked array
        copies its weights on every step (10x slower per token on CPU).
        """
        if scan == self.config.scan_layers:
            return self
        n = self.config.num_layers
        # Only references are dropped, never Variables mutated: a clone may share them.
        if scan:
            graphdef, _ = nnx.split(self.layers[0])
            per_layer = [list(nnx.to_flat_state(nnx.state(block))) for block in self.layers]
            self.layers = None
            stacked = {}
            while per_layer[0]:
                leaves = [layer.pop(0) for layer in per_layer]
                path, variable = leaves[0]
                stacked[path] = variable.replace(jnp.stack([leaf.get_value() for _, leaf in leaves]))
                del leaves, variable
            self.layers = nnx.merge(graphdef, nnx.from_flat_state(stacked))
        else:
            graphdef, state = nnx.split(self.layers)
            flat = list(nnx.to_flat_state(state))
            self.layers = state = None
            per_layer = [{} for _ in range(n)]
            while flat:
                path, variable = flat.pop(0)
                value = variable.get_value()
                for i in range(n):
                    per_layer[i][path] = variable.replace(value[i])
                del variable, value
            self.layers = nnx.List([nnx.merge(graphdef, nnx.from_flat_state(layer)) for layer in per_layer])
        self.config = self.config.replace(scan_layers=scan)
        return self

    def _prepare(self, input_ids, attention_mask_):
        valid = (jnp.ones(input_ids.shape, bool) if attention_mask_ is None
                 else jnp.asarray(attention_mask_).astype(bool))
        positions = self.positions(valid)
        mask = attention_mask(valid, valid)
        return self.embed(input_ids, positions), mask, *self.rope(positions)

    # ---- forwards ------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None) -> ForwardOutput:
        """Training forward: final logits and every configured exit's logits and hidden states."""
        h, mask, cos, sin = self._prepare(input_ids, attention_mask)
        _, hidden = self.run_layers(h, mask, cos, sin, self.config.num_layers, collect=True)
        exits = jnp.asarray(self.config.exit_layers)
        exit_hidden = hidden[exits]
        n, b, t, d = exit_hidden.shape
        exit_logits = self.shared_head(self.through_heads(exit_hidden).reshape(n * b, t, d)).reshape(n, b, t, -1)
        return ForwardOutput(exit_logits[-1], exit_logits, exit_hidden)

    def forward_logits(self, input_ids, attention_mask=None, layer: int | None = None):
        """Logits at one layer (default the last), running only the layers up to it."""
        layer = self.config.num_layers - 1 if layer is None else layer
        h, mask, cos, sin = self._prepare(input_ids, attention_mask)
        h, _ = self.run_layers(h, mask, cos, sin, layer + 1, collect=False)
        return self.exit_head(h, layer)

    def logits(self, input_ids, attention_mask=None, layer: int | None = None):
        """[B, T, V] float32 logits through the exit head after 0-based decoder `layer` (None: final)."""
        input_ids, attention_mask = check_inputs(self.config, input_ids, attention_mask)
        if layer is not None and not (isinstance(layer, int) and 0 <= layer < self.config.num_layers):
            raise GreencodeError(f"layer={layer!r}: expected a 0-based decoder layer in 0..{self.config.num_layers - 1}")
        graphdef, state = nnx.split(self)
        return _jitted_logits(graphdef, state, input_ids, attention_mask, layer)


    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Early-exit generation; see `greencode_jax.generate.generate` for the arguments."""
        from greencode_jax.generate import generate  # generate builds on models, not the reverse

        return generate(self, input_ids, attention_mask, **kwargs)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _jitted_logits(graphdef, state, input_ids, attention_mask, layer):
    return nnx.merge(graphdef, state).forward_logits(input_ids, attention_mask, layer)


def check_inputs(config: ModelConfig, input_ids, attention_mask):
    """Validates token ids and mask shapes, naming what is wrong."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise GreencodeError(f"input_ids: expected an integer array [batch, length], got {input_ids.dtype}{list(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise GreencodeError("input_ids: the prompt is empty")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise GreencodeError(f"input_ids: length {input_ids.shape[1]} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise GreencodeError(f"attention_mask: shape {list(attention_mask.shape)} differs from "
                                 f"input_ids {list(input_ids.shape)}")
    return input_ids, attention_mask


def init_model(config: ModelConfig, dtype="float32", seed: int = 0) -> EarlyExitLM:
    """A randomly initialised model (for training from scratch and for tests)."""
    return EarlyExitLM(config, dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, dtype="float32") -> EarlyExitLM:
    """The model's structure with shape-only parameters: allocates no weights."""
    return nnx.eval_shape(lambda: EarlyExitLM(config, dtype, rngs=nnx.Rngs(0)))
