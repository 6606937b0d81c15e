"""The `serve` config section: `greencode serve`'s settings (its flags override them)."""

from __future__ import annotations

import dataclasses

from greencode_jax.config.base import Section
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import check_finite


ENGINES = ("batched", "sequential")


@dataclasses.dataclass(frozen=True)
class ServeSection(Section):
    NAME = "serve"
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 8  # sequences decoded together (each with its own KV-cache row)
    max_context: int = 1024  # prompt + max_tokens, in tokens (at most the model's positions)
    max_queue: int = 64  # sequences waiting for a slot; more: 429 at once
    tokens_per_step: int = 4  # decode steps per dispatch from the engine thread (fewer host round trips)
    policy: str = ""  # the default policy, as evaluation specs write it ("": learned with --policy, else full)
    threshold: float | None = None  # the default threshold (None: the certified one, else 0.9)
    temperature: float = 0.0  # the default temperature (0: greedy, as GREEN-CODE's endpoint decodes)
    max_n: int = 4  # the largest `n` (choices per prompt) a request may ask
    cost_model: str = ""  # `greencode energy calibrate --out` JSON for modelled joules ("": none)
    engine: str = "batched"  # "sequential": GREEN-CODE's shape, one request at a time, one generate each

    def __post_init__(self):
        check_finite(self, "serve")
        for name in ("slots", "max_context", "max_queue", "tokens_per_step", "max_n"):
            if getattr(self, name) < 1:
                raise GreencodeError(f"serve.{name}={getattr(self, name)!r}: expected a positive integer")
        if not 0 <= self.port <= 65535:
            raise GreencodeError(f"serve.port={self.port}: expected 0..65535 (0: any free port)")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise GreencodeError(f"serve.threshold={self.threshold}: expected a number in [0, 1]")
        if self.engine not in ENGINES:
            raise GreencodeError(f"serve.engine={self.engine!r}: expected one of {list(ENGINES)}")
        if self.temperature < 0:
            raise GreencodeError(f"serve.temperature={self.temperature}: expected >= 0 (0: greedy)")
