"""`EvalConfig`: the evaluation's settings, from the `eval` section of a YAML config.

One `eval` section serves both the fine-tuning stage and this one. Fine-tuning reads
`split`, `batches` and `every` (`train.config.EvalSection`); evaluation reads the fields
below, and shares `split` with the same meaning: the held-out split that is evaluated.
`EvalConfig.from_dict` ignores fine-tuning's own fields, and `finetune_fields` picks those
out of a section for `train.config.EvalSection`, so the two field sets live in one mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from greencode_jax.errors import GreencodeError

PROTOCOLS = ("completion", "line")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    samples: int = 1000  # per protocol: the first N test documents that give a sample (0: all)
    batch_size: tuple = (1,)  # each batch size evaluated (an int is one size), e.g. (1, 8)
    policies: str = ""  # the policy SPEC (eval/spec.py); "": the default set
    protocols: tuple = ()  # "completion" and/or "line"; (): completion, plus line where the corpus has it
    split: str = "test"  # the split of the completion protocol (line-level samples come from test)
    context_fraction: float = 0.2  # completion: the first 20 % of a file's tokens as context (GREEN-CODE)
    new_tokens: int = 15  # completion: tokens generated and compared (GREEN-CODE)
    line_new_tokens: int = 32  # line: at most this many tokens, cut at the line's end as CodeXGLUE does
    max_context: int = 2048  # longest prompt plus new tokens (also capped by the model's positions)
    pad_prompts: int = 0  # left-pad each batch to a multiple of this many tokens (0: generate's 64-token buckets)
    confidence_thresholds: tuple = (0.5, 0.7, 0.8, 0.9, 0.95)  # grid of a bare `confidence` item
    thresholds: tuple = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # grid of a bare `learned` item (1.0 is added)
    cost_model: str = ""  # `greencode energy calibrate --out` JSON for the modelled joules ("": none)
    allow_foreign_policy: bool = False  # evaluate a policy trained on another checkpoint (the report says so)
    certified: str = ""  # `greencode certify` JSON: adds the rows learned@certified, confidence@certified ("": none)

    def __post_init__(self):
        sizes = (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            _bad("batch_size", self.batch_size, "a positive integer or a list of them")
        object.__setattr__(self, "batch_size", tuple(dict.fromkeys(sizes)))
        protocols = (self.protocols,) if isinstance(self.protocols, str) else tuple(self.protocols)
        if any(p not in PROTOCOLS for p in protocols):
            _bad("protocols", self.protocols, f"a list of {' and '.join(PROTOCOLS)}")
        object.__setattr__(self, "protocols", tuple(dict.fromkeys(protocols)))
        for name in ("samples", "pad_prompts"):
            _integer(name, getattr(self, name), minimum=0)
        for name in ("new_tokens", "line_new_tokens", "max_context"):
            _integer(name, getattr(self, name), minimum=1)
        if self.max_context <= max(self.new_tokens, self.line_new_tokens):
            _bad("max_context", self.max_context, "more than new_tokens and line_new_tokens")
        if isinstance(self.context_fraction, bool) or not isinstance(self.context_fraction, (int, float)) \
                or not 0.0 < self.context_fraction < 1.0:
            _bad("context_fraction", self.context_fraction, "a number between 0 and 1")
        for name in ("confidence_thresholds", "thresholds"):
            values = getattr(self, name)
            values = (values,) if isinstance(values, (int, float)) else values
            if not isinstance(values, (list, tuple)) or not values or any(
                    isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                    or not 0.0 <= t <= 1.0 for t in values):
                _bad(name, getattr(self, name), "a non-empty list of thresholds in 0..1")
            object.__setattr__(self, name, tuple(float(t) for t in values))
        for name in ("policies", "split", "cost_model", "certified"):
            if not isinstance(getattr(self, name), str):
                _bad(name, getattr(self, name), "a string")
        if not isinstance(self.allow_foreign_policy, bool):
            _bad("allow_foreign_policy", self.allow_foreign_policy, "true or false")

    @classmethod
    def from_dict(cls, values: dict, source: str = "eval config") -> "EvalConfig":
        """From an `eval` section: fine-tuning's own fields are skipped, any other unknown field is an error."""
        if not isinstance(values, dict):
            raise GreencodeError(f"{source}: section 'eval' must be a mapping, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        ours = {}
        for key, value in values.items():
            if key in names:
                ours[key] = value
            elif key not in finetune_only_fields():
                close = difflib.get_close_matches(key, names + list(finetune_only_fields()), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise GreencodeError(f"{source}: unknown field 'eval.{key}'{hint}")
        if isinstance(ours.get("context_fraction"), str):
            from greencode_jax.yamlfile import as_float

            ours["context_fraction"] = as_float(ours["context_fraction"])
        try:
            return cls(**ours)
        except GreencodeError as error:
            raise GreencodeError(f"{source}: {error}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def finetune_only_fields() -> tuple[str, ...]:
    """Fields of the `eval` section that only fine-tuning reads (`train.config.EvalSection`)."""
    from greencode_jax.train.config import EvalSection

    ours = {f.name for f in dataclasses.fields(EvalConfig)}
    return tuple(f.name for f in dataclasses.fields(EvalSection) if f.name not in ours)


def finetune_fields(values: dict) -> dict:
    """The part of an `eval` section that `train.config.EvalSection` takes (fine-tuning's fields)."""
    from greencode_jax.train.config import EvalSection

    names = {f.name for f in dataclasses.fields(EvalSection)}
    return {k: v for k, v in values.items() if k in names}


def _bad(name, value, expected):
    raise GreencodeError(f"field 'eval.{name}' is {value!r}, expected {expected}")


def _integer(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _bad(name, value, f"an integer >= {minimum}")
