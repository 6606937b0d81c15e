"""Exit policies: pure-JAX decisions taken inside the jitted decode step.

A policy is a pytree: its numbers (threshold, target layer, MLP weights) are traced
leaves, so changing them never recompiles; its kind and options are static. At each
configured exit layer the decode step asks `decide(layer, hidden, logits)` for a
boolean per sequence. `logits` is only computed for policies with `needs_logits`
(the LM head over the vocabulary is the most expensive part of a shallow exit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from greencode_jax.errors import GreencodeError

CONFIDENCE_MEASURES = ("softmax_max", "top2_margin")
LEARNED_KERNELS = ("xla", "pallas")


def _policy(cls):
    """A frozen dataclass registered as a pytree: fields marked static are part of the treedef."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]
    meta = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]
    return jax.tree_util.register_dataclass(cls, data, meta)


def _static(default):
    return dataclasses.field(default=default, metadata={"static": True})


@_policy
class Full:
    """Never exits early: every token runs every layer."""

    min_layer: int = _static(0)
    kind: ClassVar[str] = "full"
    needs_logits: ClassVar[bool] = False

    def decide(self, layer: int, hidden, logits):
        return jnp.zeros(hidden.shape[0], bool)


@_policy
class FixedExit:
    """Exits at `layer` (0-based), which must be one of the model's exit layers."""

    layer: Any = 0
    min_layer: int = _static(0)
    kind: ClassVar[str] = "fixed"
    needs_logits: ClassVar[bool] = False

    def decide(self, layer: int, hidden, logits):
        return jnp.broadcast_to(layer >= jnp.asarray(self.layer), (hidden.shape[0],))


@_policy
class Confidence:
    """CALM's confidence exits: exit once the exit head is confident enough.

    `softmax_max`: the top probability; `top2_margin`: top-1 minus top-2 probability.
    A threshold of 0 exits at the first allowed exit; above 1 it never exits.
    """

    threshold: Any = 0.9
    measure: str = _static("softmax_max")
    min_layer: int = _static(0)
    kind: ClassVar[str] = "confidence"
    needs_logits: ClassVar[bool] = True

    def __post_init__(self):
        if self.measure not in CONFIDENCE_MEASURES:
            raise GreencodeError(f"Confidence measure {self.measure!r}: expected one of {CONFIDENCE_MEASURES}")

    def decide(self, layer: int, hidden, logits):
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if self.measure == "softmax_max":
            confidence = probs.max(-1)
        else:
            top2 = jax.lax.top_k(probs, 2)[0]
            confidence = top2[..., 0] - top2[..., 1]
        return confidence >= self.threshold


@_policy
class Learned:
    """An actor MLP over the exit layer's hidden state: exit iff P(exit) > threshold.

    `params` holds `obs_mean`/`obs_std` (the observation normalisation used in training,
    applied here too: GREEN-CODE normalised in training only) and the layers of an MLP
    with tanh activations whose last layer has two logits (continue, exit).
    `kernel`: "xla" lets XLA compile the MLP; "pallas" runs it as two fused kernels
    (generate.policy_kernel: fewer launches per decision on a GPU, interpreted elsewhere).
    """

    params: Any = None
    threshold: Any = 0.9
    min_layer: int = _static(0)
    kernel: str = _static("xla")
    kind: ClassVar[str] = "learned"
    needs_logits: ClassVar[bool] = False

    def __post_init__(self):
        if self.kernel not in LEARNED_KERNELS:
            raise GreencodeError(f"Learned kernel {self.kernel!r}: expected one of {LEARNED_KERNELS}")

    @staticmethod
    def init_params(key, hidden_size: int, widths=(64, 64)) -> dict:
        """Random actor parameters (the RL stage trains them)."""
        sizes = (hidden_size, *widths, 2)
        keys = jax.random.split(key, len(sizes) - 1)
        layers = [{"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
                  for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
        return {"obs_mean": jnp.zeros(hidden_size), "obs_std": jnp.ones(hidden_size), "layers": layers}

    def exit_probability(self, hidden):
        """P(exit) [B] for hidden states [B, E]."""
        if self.kernel == "pallas":
            from greencode_jax.generate.policy_kernel import fused_exit_probability

            return fused_exit_probability(self.params, hidden)
        p = self.params
        x = (hidden.astype(jnp.float32) - p["obs_mean"]) / p["obs_std"]
        *body, last = p["layers"]
        # Full float32 products: on a GPU XLA's default precision rounds float32 operands to
        # TF32, which moves P(exit) by ~1e-4 and so flips decisions near the threshold.
        dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        for layer in body:
            x = jnp.tanh(dot(x, layer["w"]) + layer["b"])
        return jax.nn.softmax(dot(x, last["w"]) + last["b"], axis=-1)[..., 1]

    def decide(self, layer: int, hidden, logits):
        return self.exit_probability(hidden) > self.threshold


POLICY_TYPES = (Full, FixedExit, Confidence, Learned)
