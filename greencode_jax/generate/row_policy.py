"""`PerRow`: a different exit policy for each row of one decode step (serve's continuous batching).

Each row carries its kind, threshold and fixed layer as numbers, so requests with any mix of
policies share one compiled step; rows of kind `learned` share the one loaded actor's params.
The static part is only whether exit logits are computed at each decision (needed by the
confidence rows): at most two compiled variants of a step.

    rows = PerRow.of([Full(), FixedExit(3), Confidence(0.9), learned], learned_params=learned.params)
    decode_token(model, rows, ...)  # row b decides as its own policy would alone
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.errors import GreencodeError
from greencode_jax.generate.policies import Confidence, FixedExit, Full, Learned, _policy, _static

FULL, FIXED, CONFIDENCE_MAX, CONFIDENCE_MARGIN, LEARNED = range(5)


def row_kind(policy) -> int:
    """The kind index of one single-kind policy."""
    if isinstance(policy, Full):
        return FULL
    if isinstance(policy, FixedExit):
        return FIXED
    if isinstance(policy, Confidence):
        return CONFIDENCE_MAX if policy.measure == "softmax_max" else CONFIDENCE_MARGIN
    if isinstance(policy, Learned):
        return LEARNED
    raise GreencodeError(f"policy {policy!r}: expected Full, FixedExit, Confidence or Learned")


@_policy
class PerRow:
    """Row b decides as the single-kind policy its numbers describe (see `of`)."""

    kinds: Any = None  # [B] int32: FULL, FIXED, CONFIDENCE_MAX, CONFIDENCE_MARGIN or LEARNED
    thresholds: Any = None  # [B] float32 (confidence, learned)
    layers: Any = None  # [B] int32 (fixed)
    params: Any = None  # the Learned actor's params, shared by every learned row (None: no learned row)
    needs_logits: bool = _static(True)  # whether confidence rows may be present
    min_layer: int = _static(0)
    kind: ClassVar[str] = "per_row"

    @classmethod
    def of(cls, policies, learned_params=None, needs_logits: bool | None = None) -> "PerRow":
        """The rows of `policies` (one per row). Learned rows must use `learned_params` (their
        thresholds may differ); `needs_logits` defaults to whether any row is a confidence row."""
        kinds = [row_kind(p) for p in policies]
        if any(p.min_layer for p in policies):
            raise GreencodeError("PerRow: policies with a min_layer are not supported")
        if LEARNED in kinds and (learned_params is None or
                                 any(p.params is not learned_params for p in policies if isinstance(p, Learned))):
            raise GreencodeError("PerRow: every Learned row must share the one actor passed as learned_params")
        confidence = any(k in (CONFIDENCE_MAX, CONFIDENCE_MARGIN) for k in kinds)
        needs_logits = confidence if needs_logits is None else needs_logits
        if confidence and not needs_logits:
            raise GreencodeError("PerRow: confidence rows need needs_logits=True")
        thresholds = [float(getattr(p, "threshold", 0.0)) for p in policies]
        layers = [int(np.asarray(p.layer)) if isinstance(p, FixedExit) else 0 for p in policies]
        return cls(jnp.asarray(kinds, jnp.int32), jnp.asarray(thresholds, jnp.float32), jnp.asarray(layers, jnp.int32),
                   learned_params, needs_logits=needs_logits)

    def decide(self, layer: int, hidden, logits):
        kinds, threshold = self.kinds, self.thresholds
        never = jnp.zeros(hidden.shape[0], bool)
        choices = {FIXED: layer >= self.layers}
        if logits is not None:  # as Confidence.decide: float32 softmax, top probability or top-2 margin
            top2 = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 2)[0]
            choices[CONFIDENCE_MAX] = top2[:, 0] >= threshold
            choices[CONFIDENCE_MARGIN] = top2[:, 0] - top2[:, 1] >= threshold
        if self.params is not None:
            choices[LEARNED] = Learned(self.params).exit_probability(hidden) > threshold
        return jnp.select([kinds == k for k in choices], list(choices.values()), never)
