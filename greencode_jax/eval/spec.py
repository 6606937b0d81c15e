"""The policy SPEC of `greencode evaluate --policies`: which policies, at which settings.

    full; base; fixed:3,7; confidence:softmax_max@0.8,0.9; learned@0.6,0.9

Items are separated by `;`, each `FAMILY[:ARGS][@THRESHOLDS]`:

* `full`: `Full()` of the checkpoint. Always evaluated, first: every comparison
  (agreement, energy saved) is against it.
* `base`: `Full()` of the `--base` checkpoint (GREEN-CODE's "Base").
* `fixed:3,7`: `FixedExit` at those 0-based layers; `fixed` alone: every exit layer but
  the last (`FixedExit` at the last layer is `Full()`).
* `confidence:MEASURE[,MEASURE]@T[,T]`: CALM's `Confidence` exits; without `:MEASURE`
  both `softmax_max` and `top2_margin`, without `@T` the default grid.
* `learned@T[,T]`: the `--policy` actor at those thresholds; `learned` alone: the default
  grid plus 1.0, a threshold P(exit) > T never reaches, so that row is the actor's own cost
  against `Full()`.

Labels: `full`, `base`, `fixed:3`, `confidence:softmax_max@0.9`, `learned@0.9`.
`parse_spec` checks the syntax (no model needed); `expand` checks layers against the model
and returns one `PolicyChoice` per evaluated policy.
"""

from __future__ import annotations

import dataclasses
import math

from greencode_jax.errors import GreencodeError

FAMILIES = ("full", "base", "fixed", "confidence", "learned")
MEASURES = ("softmax_max", "top2_margin")
CONFIDENCE_GRID = (0.5, 0.7, 0.8, 0.9, 0.95)
LEARNED_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
NEVER_EXITS = 1.0  # P(exit) > 1.0 never holds: the Learned row that measures the actor's own cost


@dataclasses.dataclass(frozen=True)
class SpecItem:
    """One `;`-separated item as written: its family, `:` arguments and `@` thresholds (None: not given)."""

    family: str
    args: tuple | None = None
    thresholds: tuple | None = None
    text: str = ""


@dataclasses.dataclass(frozen=True)
class PolicyChoice:
    """One evaluated policy: its label, family, setting (as records carry it) and which model runs it."""

    label: str
    family: str
    setting: str | float | int | None
    model: str  # "checkpoint" or "base"
    layer: int | None = None  # fixed
    measure: str | None = None  # confidence
    threshold: float | None = None  # confidence, learned

    def build(self, learned=None):
        """The `greencode_jax.generate` policy object; `learned` is the loaded `Learned` for that family."""
        from greencode_jax.generate import Confidence, FixedExit, Full  # lazy: keeps eval.spec free of JAX

        if self.family in ("full", "base"):
            return Full()
        if self.family == "fixed":
            return FixedExit(self.layer)
        if self.family == "confidence":
            return Confidence(self.threshold, measure=self.measure)
        return dataclasses.replace(learned, threshold=self.threshold)


def _fail(text: str, what: str):
    raise GreencodeError(f"policy spec item {text!r}: {what}. Syntax: 'full; base; fixed:3,7; "
                         "confidence:softmax_max@0.8,0.9; learned@0.6,0.9'")


def _thresholds(raw: str, text: str) -> tuple[float, ...]:
    values = []
    for part in raw.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            _fail(text, f"threshold {part!r} is not a number")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            _fail(text, f"threshold {part} is outside 0..1")
        values.append(value)
    return tuple(dict.fromkeys(values))


def parse_spec(spec: str) -> tuple[SpecItem, ...]:
    """The items of a SPEC string, syntax checked; an unknown family or a malformed layer or
    threshold raises one GreencodeError naming the item."""
    if not isinstance(spec, str):
        raise GreencodeError(f"policy spec {spec!r}: expected a string such as 'full; fixed:3,7; learned@0.9'")
    items = []
    for text in (part.strip() for part in spec.split(";")):
        if not text:
            continue
        head, at, raw_thresholds = text.partition("@")
        family, colon, raw_args = (s.strip() for s in head.partition(":"))
        family = family.lower()
        if family not in FAMILIES:
            _fail(text, f"unknown policy family {family!r}; expected one of {', '.join(FAMILIES)}")
        args = thresholds = None
        if colon:
            if family not in ("fixed", "confidence"):
                _fail(text, f"{family} takes no ':' arguments")
            parts = [p.strip() for p in raw_args.split(",")]
            if not all(parts):
                _fail(text, "empty ':' argument")
            if family == "fixed":
                try:
                    args = tuple(dict.fromkeys(int(p) for p in parts))
                except ValueError:
                    _fail(text, f"layers {raw_args!r}: expected 0-based layer indices such as 3,7")
            else:
                unknown = [p for p in parts if p not in MEASURES]
                if unknown:
                    _fail(text, f"unknown confidence measure {unknown[0]!r}; expected {' or '.join(MEASURES)}")
                args = tuple(dict.fromkeys(parts))
        if at:
            if family not in ("confidence", "learned"):
                _fail(text, f"{family} takes no '@' thresholds")
            if not raw_thresholds.strip():
                _fail(text, "no threshold after '@'")
            thresholds = _thresholds(raw_thresholds, text)
        items.append(SpecItem(family, args, thresholds, text))
    if not items:
        raise GreencodeError(f"policy spec {spec!r} names no policy")
    return tuple(items)


def default_spec(*, have_base: bool, have_policy: bool) -> str:
    """The default set: Base (with --base), Full, every fixed exit, both confidence measures over
    their grid and Learned (with --policy) over its grid and the never-reached threshold."""
    return "; ".join(f for f, ok in (("base", have_base), ("full", True), ("fixed", True), ("confidence", True),
                                     ("learned", have_policy)) if ok)


def _label(family: str, setting) -> str:
    if setting is None:
        return family
    if family == "fixed":
        return f"fixed:{setting}"
    if family == "confidence":
        return f"confidence:{setting}"
    return f"learned@{setting!r}"


def expand(items, exit_layers, *, have_base: bool, have_policy: bool, confidence_grid=CONFIDENCE_GRID,
           learned_grid=LEARNED_GRID) -> list[PolicyChoice]:
    """One PolicyChoice per evaluated policy, `full` first, duplicates dropped, in SPEC order.

    `exit_layers` are the checkpoint's (0-based, the last layer included). Raises a
    GreencodeError for a layer that is not an exit, `base` without a base model and
    `learned` without a policy."""
    exit_layers = tuple(int(e) for e in exit_layers)
    last = exit_layers[-1]
    choices = [PolicyChoice("full", "full", None, "checkpoint")]
    for item in items:
        if item.family == "full":
            continue
        if item.family == "base":
            if not have_base:
                raise GreencodeError(f"policy spec item {item.text!r}: no base model; pass --base CHECKPOINT")
            choices.append(PolicyChoice("base", "base", None, "base"))
        elif item.family == "fixed":
            layers = item.args if item.args is not None else tuple(e for e in exit_layers if e != last)
            for layer in layers:
                if layer not in exit_layers:
                    raise GreencodeError(f"policy spec item {item.text!r}: layer {layer} is not one of the model's "
                                         f"exit layers {list(exit_layers)} (0-based)")
                choices.append(PolicyChoice(_label("fixed", layer), "fixed", layer, "checkpoint", layer=layer))
        elif item.family == "confidence":
            for measure in item.args or MEASURES:
                for t in item.thresholds or tuple(confidence_grid):
                    setting = f"{measure}@{float(t)!r}"
                    choices.append(PolicyChoice(_label("confidence", setting), "confidence", setting, "checkpoint",
                                                measure=measure, threshold=float(t)))
        else:
            if not have_policy:
                raise GreencodeError(f"policy spec item {item.text!r}: no learned policy; pass --policy DIR "
                                     "(what train-policy wrote)")
            grid = item.thresholds or (*learned_grid, NEVER_EXITS)
            for t in dict.fromkeys(float(t) for t in grid):
                choices.append(PolicyChoice(_label("learned", t), "learned", t, "checkpoint", threshold=t))
    seen, out = set(), []
    for choice in choices:
        if choice.label not in seen:
            seen.add(choice.label)
            out.append(choice)
    return out


def policy_choices(spec: str | None, exit_layers, *, have_base: bool, have_policy: bool,
                   confidence_grid=CONFIDENCE_GRID, learned_grid=LEARNED_GRID) -> list[PolicyChoice]:
    """`expand(parse_spec(spec))`, the default set when `spec` is None or empty."""
    text = spec if spec and spec.strip() else default_spec(have_base=have_base, have_policy=have_policy)
    return expand(parse_spec(text), exit_layers, have_base=have_base, have_policy=have_policy,
                  confidence_grid=confidence_grid, learned_grid=learned_grid)
