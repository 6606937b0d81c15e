"""A request's `policy` and `threshold` fields -> the generate policy that serves it.

The policy is written as evaluation specs write one item (eval/spec.py's parser): `full`,
`fixed:k`, `confidence`, `confidence:top2_margin`, `learned`, with an optional `@T`. The
threshold is, in order: the spec's `@T`, the request's `threshold`, the server's default
(serve.threshold), the certified threshold of that family (certify.json in or next to the
policy directory), else DEFAULT_THRESHOLD. A family certified as "never exit" keeps that
default: a threshold no decision reaches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from greencode_jax.errors import GreencodeError
from greencode_jax.eval.certify_run import load_certification
from greencode_jax.eval.spec import expand, parse_spec
from greencode_jax.generate.policies import Confidence, Learned

DEFAULT_THRESHOLD = 0.9
NEVER = {"learned": 1.0, "confidence": float("inf")}  # P(exit) > 1 and confidence >= inf never hold
CERTIFICATION = "certify.json"


def find_certification(policy_dir) -> Path | None:
    """certify.json in the policy directory or next to it (a `greencode run` writes it beside)."""
    if policy_dir is None:
        return None
    for candidate in (Path(policy_dir) / CERTIFICATION, Path(policy_dir).parent / CERTIFICATION):
        if candidate.is_file():
            return candidate
    return None


def certified_thresholds(path) -> dict:
    """family -> certified threshold (NEVER's value where it certified none) of a certify.json."""
    if path is None:
        return {}
    out = {}
    for family, entry in load_certification(path)["families"].items():
        if family in NEVER and isinstance(entry, dict):
            value = entry.get("certified")
            out[family] = NEVER[family] if value is None else float(value)
    return out


@dataclasses.dataclass(frozen=True)
class PolicyResolver:
    exit_layers: tuple
    learned: Learned | None = None
    certified: dict = dataclasses.field(default_factory=dict)
    default_spec: str = "full"
    default_threshold: float | None = None

    def resolve(self, spec: str | None, threshold: float | None):
        """(policy, family, label) of one request; GreencodeError for a spec that names no single
        policy of this server."""
        items = parse_spec(spec if spec else self.default_spec)
        if len(items) != 1:
            raise GreencodeError(f"policy {spec!r}: name one policy, e.g. 'confidence' or 'fixed:3'")
        item = items[0]
        if item.family == "fixed" and (item.args is None or len(item.args) != 1):
            raise GreencodeError(f"policy {item.text!r}: name one exit layer, e.g. 'fixed:{self.exit_layers[0]}' "
                                 f"(this model exits at {list(self.exit_layers)})")
        if item.family == "confidence" and item.args is not None and len(item.args) != 1:
            raise GreencodeError(f"policy {item.text!r}: name one confidence measure")
        if item.thresholds is not None and len(item.thresholds) != 1:
            raise GreencodeError(f"policy {item.text!r}: give one threshold")
        if item.family == "confidence" and item.args is None:
            item = dataclasses.replace(item, args=("softmax_max",))
        chosen = self._threshold(item, threshold)
        choices = expand([item], self.exit_layers, have_base=False, have_policy=self.learned is not None,
                         confidence_grid=(chosen,), learned_grid=(chosen,))
        choice = choices[-1]  # expand puts `full` first; the item's own choice is last
        policy = choice.build(self.learned)
        if isinstance(policy, (Confidence, Learned)) and policy.threshold != chosen:  # build reads the label's float
            policy = dataclasses.replace(policy, threshold=chosen)
        return policy, choice.family, _label(choice.family, policy)

    def _threshold(self, item, threshold: float | None) -> float:
        if item.thresholds is not None:
            return item.thresholds[0]
        for value in (threshold, self.default_threshold, self.certified.get(item.family)):
            if value is not None:
                return float(value)
        return DEFAULT_THRESHOLD


def _label(family: str, policy) -> str:
    if family == "fixed":
        return f"fixed:{int(policy.layer)}"
    if family == "confidence":
        return f"confidence:{policy.measure}@{policy.threshold:g}"
    if family == "learned":
        return f"learned@{policy.threshold:g}"
    return family
