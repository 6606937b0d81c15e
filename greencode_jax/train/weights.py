"""Exit-loss weighting schemes: how much each exit's cross-entropy counts in the aggregated loss.

    L = sum_i w_i * CE(exit_i)        (exits in `config.exit_layers` order; the last is the final layer)

Schemes:
- `greencode` (GREEN-CODE's "geometric"): the final layer gets 0.1; the other exits form two
  groups by depth, the first-half group sharing 0.7 and the second-half group 0.2, each group
  split geometrically with ratio 0.9 (the shallowest exit of a group gets the most) and
  normalised within the group.
  The split is by layer, not by count: exit layer l (0-based) is in the first half when
  2*l < num_layers, i.e. it lies in decoder layers 0 .. num_layers/2 - 1. This is the only
  rule that gives the GREEN-CODE paper's two lists: Llama-3.2-3B (28 layers) puts 3..13 | 17,21,25 and
  OPT-2.7B (32 layers) 3..15 | 19,23,27, so the groups have 6|3 and 7|3 exits (a split by
  count would give 5|4 and 5|5). When a group is empty its share is dropped and the weights
  are rescaled to sum to 1 (so a final-only model gets weight 1).
- `uniform`: 1 / (number of exits, final included) each.
- `linear` (CALM's anytime loss): proportional to the 1-based layer number, l + 1, summing to 1.
- an explicit list: one non-negative weight per exit (final included), used as given.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from greencode_jax.errors import GreencodeError

SCHEMES = ("greencode", "uniform", "linear")
GREENCODE_SHARES = (0.7, 0.2, 0.1)  # first-half exits, second-half exits, final layer
GREENCODE_RATIO = 0.9


def _geometric(n: int, ratio: float, share: float) -> list[float]:
    raw = [ratio**k for k in range(n)]
    total = sum(raw)
    return [share * r / total for r in raw]


def greencode_weights(exit_layers: Sequence[int], num_layers: int) -> list[float]:
    """GREEN-CODE's geometric scheme (see the module docstring for the first/second-half rule)."""
    *inner, final = exit_layers
    first = [layer for layer in inner if 2 * layer < num_layers]
    second = [layer for layer in inner if 2 * layer >= num_layers]
    first_share, second_share, final_share = GREENCODE_SHARES
    weights = (_geometric(len(first), GREENCODE_RATIO, first_share)
               + _geometric(len(second), GREENCODE_RATIO, second_share) + [final_share])
    total = first_share * bool(first) + second_share * bool(second) + final_share
    return [w / total for w in weights]


def exit_weights(scheme, exit_layers: Sequence[int], num_layers: int, field: str = "train.exit_weights"
                 ) -> list[float]:
    """The weight of each exit in `exit_layers` (sorted, the last being num_layers - 1)."""
    exit_layers = [int(layer) for layer in exit_layers]
    if not exit_layers or exit_layers[-1] != num_layers - 1 or exit_layers != sorted(set(exit_layers)):
        raise GreencodeError(f"exit layers {exit_layers}: expected sorted distinct 0-based layers ending with the "
                             f"final layer {num_layers - 1}")
    n = len(exit_layers)
    if isinstance(scheme, str):
        if scheme == "greencode":
            return greencode_weights(exit_layers, num_layers)
        if scheme == "uniform":
            return [1.0 / n] * n
        if scheme == "linear":
            total = sum(layer + 1 for layer in exit_layers)
            return [(layer + 1) / total for layer in exit_layers]
        raise GreencodeError(f"{field}: unknown scheme {scheme!r}; expected one of {list(SCHEMES)} or a list of "
                             f"{n} weights (one per exit layer {exit_layers})")
    values = list(scheme) if isinstance(scheme, (list, tuple)) else None
    if values is None or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise GreencodeError(f"{field}: got {scheme!r}; expected a scheme name ({', '.join(SCHEMES)}) or a list "
                             "of numbers")
    if len(values) != n:
        raise GreencodeError(f"{field}: {len(values)} weights for {n} exits {exit_layers} (the final layer "
                             "counts as an exit); give one weight per exit")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise GreencodeError(f"{field}: weights {values} must be finite, non-negative and not all zero")
    return [float(v) for v in values]
