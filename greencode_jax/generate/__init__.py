"""Early-exit generation: KV cache, a `lax.cond` per layer, state propagation, exit policies.

    out = model.generate(input_ids, max_new_tokens=15, policy=gc.policies.Confidence(0.9))
    out.tokens       # [B, N] int32 (after a stop token: the pad id)
    out.exit_layers  # [B, N] 0-based layer each token exited at (the last layer: no early exit; -1: after a stop)
    out.lengths      # [B] tokens generated, the stop token included

Compilation is keyed on (batch size, prompt-length bucket, max_new_tokens, policy kind,
sampling); policy numbers (thresholds, layers, MLP weights) are traced, so changing them
never recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.errors import GreencodeError
from greencode_jax.generate import policies
from greencode_jax.generate.decode import generate_jit, generate_jit_gpu
from greencode_jax.generate.policies import POLICY_TYPES, Confidence, FixedExit, Full, Learned
from greencode_jax.generate.policy_kernel import check_supported
from greencode_jax.generate.sampling import Sampling

PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this: one compile per bucket
NEW_TOKENS_BUCKET = 16  # max_new_tokens is traced; outputs and cache have room for a multiple of this
STRATEGIES = ("skip", "masked")


class GenerateOutput(NamedTuple):
    tokens: jax.Array
    exit_layers: jax.Array
    lengths: jax.Array


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt(input_ids, attention_mask):
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
        if len({len(row) for row in input_ids}) > 1:
            raise GreencodeError("input_ids: rows of unequal lengths; left-pad them to one length and pass "
                                 "attention_mask (0 on the padding)")
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim == 2 and ids.shape[1] == 0:  # before the dtype check: np.asarray([]) is float64
        raise GreencodeError("input_ids: the prompt is empty; generation needs at least one token")
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise GreencodeError(f"input_ids: expected integer token ids [batch, length], got {ids.dtype}{list(ids.shape)}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.ndim == 1:  # the mask of one unbatched prompt, like its ids
        mask = mask[None]
    if mask.shape != ids.shape:
        raise GreencodeError(f"attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
    if not mask.any(axis=1).all():
        raise GreencodeError("attention_mask: a row has no real token (an empty prompt)")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise GreencodeError("attention_mask: padding must be on the left (a real token is followed by padding)")
    return ids, mask


def _check_policy(policy, config):
    if not isinstance(policy, POLICY_TYPES):
        raise GreencodeError(f"policy {policy!r}: expected one of {[p.__name__ for p in POLICY_TYPES]}")
    if isinstance(policy, FixedExit):
        layer = int(np.asarray(policy.layer))
        if layer not in config.exit_layers:
            raise GreencodeError(f"FixedExit({layer}): layer {layer} is not one of the model's exit layers "
                                 f"{list(config.exit_layers)} (0-based)")
    if isinstance(policy, Learned):
        _check_learned(policy, config.hidden_size)
        if policy.exit_layers is not None and tuple(policy.exit_layers) != tuple(config.exit_layers):
            raise GreencodeError(f"Learned policy: trained on exit layers {list(policy.exit_layers)}, but this model "
                                 f"exits at {list(config.exit_layers)}; train a policy on this model's rollouts")
    if not 0 <= policy.min_layer < config.num_layers:
        raise GreencodeError(f"policy min_layer={policy.min_layer}: expected 0..{config.num_layers - 1}")


def _check_learned(policy, hidden_size: int):
    """The actor's params as Learned.init_params lays them out, for this model's hidden size."""
    params = policy.params
    if params is None:
        raise GreencodeError("Learned policy has no params (train them with train-policy, or Learned.init_params)")
    layout = "a dict of obs_mean [E], obs_std [E] and layers [{w: [in, out], b: [out]}, ...]"
    if not isinstance(params, Mapping) or not {"obs_mean", "obs_std", "layers"} <= params.keys() or not params["layers"]:
        raise GreencodeError(f"Learned policy params: expected {layout}")
    shapes = [(np.shape(layer.get("w")), np.shape(layer.get("b"))) if isinstance(layer, Mapping) else None
              for layer in params["layers"]]
    width = hidden_size
    for i, shape in enumerate(shapes):
        if shape is None or len(shape[0]) != 2 or shape[0][0] != width or shape[1] != shape[0][1:]:
            raise GreencodeError(f"Learned policy params: layer {i} has w, b shapes {shape}, expected w [{width}, n] "
                                 f"and b [n] (this model's hidden size is {hidden_size}; {layout})")
        width = shape[0][1]
    if width != 2 or np.shape(params["obs_mean"]) != (hidden_size,) or np.shape(params["obs_std"]) != (hidden_size,):
        raise GreencodeError(f"Learned policy params: expected 2 outputs (continue, exit) and obs_mean, obs_std of "
                             f"shape [{hidden_size}]; got {width} outputs, {np.shape(params['obs_mean'])}, "
                             f"{np.shape(params['obs_std'])}")
    if policy.kernel == "pallas":
        check_supported(params, jax.default_backend())


def _traced(policy):
    """The policy's numbers as arrays of one dtype per kind. A Python int, a Python float and
    a numpy scalar trace to different avals, so Confidence(0) after Confidence(0.5) (or a
    numpy threshold) would otherwise compile the whole generation again.

    A number becomes the same device buffer every time it is used: the decode loop reads the
    policy's numbers, and on a GPU a loop whose buffers moved since its last run is recorded
    again by the host (see decode.generate_program). Arrays pass as they are."""
    dtype = jnp.int32 if isinstance(policy, FixedExit) else jnp.float32
    return jax.tree.map(lambda leaf: _device_number(leaf, dtype) if _is_number(leaf) else jnp.asarray(leaf, dtype),
                        policy)


def _is_number(leaf) -> bool:
    return isinstance(leaf, (int, float, np.number))


@functools.lru_cache(maxsize=1024)
def _device_number(value, dtype):
    return jnp.asarray(value, dtype)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 15, policy=None,
             sampling: Sampling | None = None, key=None, stop_tokens=None, strategy: str = "skip") -> GenerateOutput:
    """Generates up to `max_new_tokens` per sequence with early exits chosen by `policy`.

    `stop_tokens` defaults to the model's eos token(s); pass () to always generate
    `max_new_tokens`. `strategy="skip"` skips a layer's attention and MLP when every
    sequence has exited (with batch 1: whenever it has); "masked" always computes them
    and masks (the same tokens; for testing and comparison). A model stored with stacked
    layers is converted in place to per-layer storage, which decoding needs.
    """
    config = model.config
    policy = Full() if policy is None else policy
    sampling = Sampling() if sampling is None else sampling
    _check_policy(policy, config)
    if strategy not in STRATEGIES:
        raise GreencodeError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GreencodeError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    ids, mask = _prompt(input_ids, attention_mask)
    longest = int(mask.sum(1).max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise GreencodeError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
    if not sampling.greedy and key is None:
        raise GreencodeError("sampling needs a PRNG key: pass key=jax.random.key(seed)")
    if config.scan_layers:
        model.set_scan_layers(False)

    padded = _round_up(ids.shape[1], PROMPT_BUCKET)
    ids = np.pad(ids, ((0, 0), (padded - ids.shape[1], 0)))
    mask = np.pad(mask, ((0, 0), (padded - mask.shape[1], 0)))
    if stop_tokens is None:
        stop_tokens = config.eos_token_id if config.eos_token_id is not None else ()
    stop_tokens = (stop_tokens,) if isinstance(stop_tokens, (int, np.integer)) else tuple(stop_tokens)
    if sampling.top_k > config.vocab_size:
        raise GreencodeError(f"sampling top_k={sampling.top_k} exceeds the vocabulary ({config.vocab_size} tokens)")
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    pad = config.pad_token_id if config.pad_token_id is not None else (stop_tokens[0] if stop_tokens else 0)
    slots = _round_up(max_new_tokens, NEW_TOKENS_BUCKET)
    program = generate_jit_gpu if jax.default_backend() == "gpu" else generate_jit
    tokens, exit_layers, lengths = program(
        model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), _traced(policy), stop, jnp.int32(pad),
        jax.random.key(0) if key is None else key, jnp.int32(max_new_tokens), sampling=sampling, token_slots=slots,
        cache_len=padded + slots, skip=strategy == "skip")
    return GenerateOutput(tokens[:, :max_new_tokens], exit_layers[:, :max_new_tokens], lengths)


__all__ = ["Confidence", "FixedExit", "Full", "GenerateOutput", "Learned", "Sampling", "generate", "policies"]
