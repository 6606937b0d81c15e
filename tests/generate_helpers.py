"""Shared pieces of the generation tests: the tiny models, prompts, and a cache-free reference.

Models. Greedy tests need models whose greedy continuation is not degenerate: a model
with a tied head and O(1) embeddings mostly repeats its last token (logits = e_x . e_y),
whatever its attention does, so a broken cache or RoPE would go unnoticed. The zoo's
untied OPT models are fine; its only llama3-rope model is tied, so one more Llama is
built here (GQA, llama3 rope, untied, 4 layers), the same way conftest builds the zoo.

Every test module shares the `gen_models` session cache below, so each model is loaded
once and each (model, batch, bucket, policy kind) compiles once for the whole session.

Reference. `reference_generate` is greedy early-exit generation that recomputes the whole
sequence at every step, without a KV cache, through the model's public pieces only:
every position p has an exit layer e_p (prompt positions: the last layer) and at layer j
its hidden state is frozen when j > e_p, h = where(j > e_p, h, block_j(h)), so a frozen
position's K/V at layer j come from its exit hidden state (CALM/GREEN-CODE state
propagation). The exit decision of the newest position is taken on its own hidden states
(numpy, from the policy's numbers), which its own exit cannot change: freezing only acts
on layers after the exit.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import greencode_jax as gc
from conftest import LLAMA3_ROPE, MAX_POSITIONS, make_inputs, randomize_, write_tokenizer_files
from greencode_jax.models.layers import attention_mask

P = gc.policies

# A Llama with everything the decode step must get right at once: GQA (2 K/V heads for 4
# query heads), llama3 rope scaling, an untied head (non-degenerate greedy output), 4 layers.
LLAMA = "llama_gqa_llama3"
LLAMA_KWARGS = dict(vocab_size=131, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False,
                    rope_parameters=dict(LLAMA3_ROPE), bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_SEED = 12

N_NEW = 15  # max_new_tokens of every test that does not say otherwise (outputs are sized to its bucket of 16)


@dataclasses.dataclass
class GenModel:
    """A tiny model for generation tests: its PyTorch twin, our per-layer model, token rows."""

    name: str
    path: Path
    torch_model: object
    ids: np.ndarray  # [2, 520] token ids, none of them pad/bos/eos

    @functools.cached_property
    def ours(self):
        return gc.load_pretrained(self.path, scan_layers=False)

    @property
    def config(self):
        return self.ours.config

    @property
    def pad_id(self) -> int:
        return self.torch_model.config.pad_token_id

    @property
    def last(self) -> int:
        return self.ours.config.num_layers - 1

    @functools.cached_property
    def reference(self) -> "Reference":
        return Reference(self.ours)


def build_llama(root: Path) -> GenModel:
    config = transformers.LlamaConfig(max_position_embeddings=MAX_POSITIONS, **LLAMA_KWARGS)
    config._attn_implementation = "eager"
    import torch

    torch.manual_seed(LLAMA_SEED)
    model = randomize_(transformers.LlamaForCausalLM(config).to(torch.float32), LLAMA_SEED)
    path = root / LLAMA
    model.save_pretrained(path)
    write_tokenizer_files(path)
    ids = make_inputs(LLAMA_KWARGS["vocab_size"], LLAMA_KWARGS["pad_token_id"], LLAMA_SEED)[0]
    return GenModel(LLAMA, path, model, ids)


class GenModels:
    """Session cache: the zoo's variants by name, plus LLAMA."""

    def __init__(self, zoo, root: Path):
        self.zoo, self.root, self._models = zoo, root, {}

    def __getitem__(self, name: str) -> GenModel:
        if name not in self._models:
            if name == LLAMA:
                self._models[name] = build_llama(self.root)
            else:
                v = self.zoo[name]
                self._models[name] = GenModel(name, v.path, v.torch_model, v.ids)
        return self._models[name]


_SESSION: dict = {}


@pytest.fixture(scope="session")
def gen_models(zoo, tmp_path_factory) -> GenModels:
    # Test modules import this fixture, and pytest keeps one instance per importing module
    # even at session scope: keep one here. A second copy of a model would compile everything
    # again (its source path is part of the model's pytree structure, which keys jit's cache).
    if "models" not in _SESSION:
        _SESSION["models"] = GenModels(zoo, tmp_path_factory.mktemp("gen_models"))
    return _SESSION["models"]


@pytest.fixture(scope="session")
def llama(gen_models) -> GenModel:
    return gen_models[LLAMA]


# ---- prompts -------------------------------------------------------------------------------------------------------

def left_pad(rows, pad_id: int):
    """Rows of token ids -> (ids [B, T], mask [B, T]) left-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def unpad(ids, mask, row: int) -> np.ndarray:
    return np.asarray(ids)[row][np.asarray(mask)[row].astype(bool)]


def rows_of(m: GenModel, lengths, start: int = 0):
    """Distinct prompts of the given lengths, taken from the model's token rows."""
    return [m.ids[i % 2, start + 7 * i: start + 7 * i + n] for i, n in enumerate(lengths)]


def run(model, ids, mask=None, **kwargs):
    """generate() with fixed lengths by default (no stop tokens); numpy outputs."""
    kwargs.setdefault("stop_tokens", ())
    kwargs.setdefault("max_new_tokens", N_NEW)
    out = model.generate(ids, mask, **kwargs)
    return gc.GenerateOutput(*(np.asarray(x) for x in out))


# ---- numpy policies --------------------------------------------------------------------------------------------------

def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def learned_exit_probability(params, hidden) -> float:
    """The Learned policy's MLP by hand, in float64: normalise, tanh layers, softmax, P(exit)."""
    x = (np.asarray(hidden, np.float64) - np.asarray(params["obs_mean"])) / np.asarray(params["obs_std"])
    *body, last = params["layers"]
    for layer in body:
        x = np.tanh(x @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64))
    return float(softmax(x @ np.asarray(last["w"], np.float64) + np.asarray(last["b"], np.float64))[1])


def statistic(policy, hidden, logits) -> float | None:
    """The number a thresholded policy compares (None for Full / FixedExit)."""
    if isinstance(policy, P.Confidence):
        probs = np.sort(softmax(logits))[::-1]
        return float(probs[0] if policy.measure == "softmax_max" else probs[0] - probs[1])
    if isinstance(policy, P.Learned):
        return learned_exit_probability(policy.params, hidden)
    return None


def decides(policy, layer: int, stat) -> bool:
    if isinstance(policy, P.Full):
        return False
    if isinstance(policy, P.FixedExit):
        return layer >= int(policy.layer)
    if isinstance(policy, P.Confidence):
        return stat >= float(policy.threshold)
    return stat > float(policy.threshold)


# ---- the cache-free reference ------------------------------------------------------------------------------------

def _hidden_states(graphdef, state, ids, exits):
    """ids [1, T], exits [1, T] -> every layer's output [L, T, H] with frozen positions.

    Layer j recomputes the whole sequence; position p keeps its hidden state when
    j > exits[p], so its K/V at such a layer come from the frozen state.
    """
    model = nnx.merge(graphdef, state)
    valid = jnp.ones(ids.shape, bool)
    positions = model.positions(valid)
    h = model.embed(ids, positions)
    cos, sin = model.rope(positions)
    mask = attention_mask(valid, valid)
    outputs = []
    for j in range(model.config.num_layers):
        new = model.block(j)(h, mask, cos, sin)
        h = jnp.where((j > exits)[:, :, None], h, new)
        outputs.append(h[0])
    return jnp.stack(outputs)


@dataclasses.dataclass
class ReferenceOutput:
    tokens: np.ndarray  # [N]
    exit_layers: np.ndarray  # [N]
    margins: np.ndarray  # [N] top-1 minus top-2 logit of each chosen token
    threshold_gaps: np.ndarray  # [N] for thresholded policies: min |statistic - threshold| over the decisions taken
    hidden: list  # per step, every layer's output at the predicting position [L, H]
    logits: np.ndarray  # [N, V] the exit head's logits at each step's exit


class Reference:
    """Greedy early-exit generation recomputing the whole sequence each step (no KV cache)."""

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.model = model
        self.config = model.config
        self._hidden = jax.jit(functools.partial(_hidden_states, graphdef))
        self._state = state
        self._head = jax.jit(lambda h: model.exit_head(h))

    def generate(self, prompt, policy, max_new_tokens: int = N_NEW) -> ReferenceOutput:
        config, last = self.config, self.config.num_layers - 1
        prompt = [int(t) for t in prompt]
        n_prompt = len(prompt)
        # One length for all steps (one compile): positions past the one read are causally invisible.
        length = n_prompt + max_new_tokens - 1
        seq = np.zeros(length, np.int32)
        seq[:n_prompt] = prompt
        exits = np.full(length, last, np.int32)
        tokens, exit_layers, margins, gaps, hidden, all_logits = [], [], [], [], [], []
        for n in range(max_new_tokens):
            p = n_prompt - 1 + n  # the position whose output predicts token n
            exits[p] = last  # its own exit does not change its own states up to the exit
            states = np.asarray(self._hidden(self._state, jnp.asarray(seq[None]), jnp.asarray(exits[None])))[:, p]
            exit_layer, gap = last, np.inf
            if n > 0:  # the prompt pass never exits
                for layer in config.exit_layers:
                    if layer == last or layer < policy.min_layer:
                        continue
                    logits = np.asarray(self._head(jnp.asarray(states[layer]))) if isinstance(
                        policy, P.Confidence) else None
                    stat = statistic(policy, states[layer], logits)
                    if stat is not None:
                        gap = min(gap, abs(stat - float(policy.threshold)))
                    if decides(policy, layer, stat):
                        exit_layer = layer
                        break
            logits = np.asarray(self._head(jnp.asarray(states[exit_layer])))
            token = int(np.argmax(logits))
            top2 = np.sort(logits)[-2:]
            exits[p] = exit_layer
            if p + 1 < length:
                seq[p + 1] = token
            tokens.append(token)
            exit_layers.append(exit_layer)
            margins.append(top2[1] - top2[0])
            gaps.append(gap)
            hidden.append(states)
            all_logits.append(logits)
        return ReferenceOutput(np.array(tokens), np.array(exit_layers), np.array(margins), np.array(gaps), hidden,
                               np.array(all_logits))


def assert_reference_is_decisive(ref: ReferenceOutput, what: str, tol: float = 1e-4):
    """Guards a comparison against float noise: no argmax near-tie, no statistic on its threshold."""
    assert ref.margins.min() > tol, f"{what}: a near-tie in the reference's argmax ({ref.margins.min():.2e})"
    assert ref.threshold_gaps.min() > tol, f"{what}: a statistic within {tol} of the threshold; pick another"


def learned_policy(hidden_size: int, threshold: float, seed: int = 0, scale: float = 1.0, **kwargs):
    params = P.Learned.init_params(jax.random.key(seed), hidden_size)
    params["layers"][-1]["w"] = params["layers"][-1]["w"] * scale  # spread P(exit) away from 0.5
    return P.Learned(params, threshold, **kwargs)
