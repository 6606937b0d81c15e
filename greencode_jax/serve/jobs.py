"""One sequence being served (`Job`): its settings, what it generated so far, and the text it
hands its client, stop strings and incomplete UTF-8 held back until they are settled."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

LENGTH, STOP, CANCELLED = "length", "stop", "cancelled"
_ids = itertools.count()


@dataclasses.dataclass
class Job:
    """One choice of one prompt. `sink(event, payload)` is called on the engine thread with
    ("delta", (text, first token, end token)) as text settles (the tokens
    that text came with: job.tokens[first:end]) and ("done", None) once, after which
    the fields below are final."""

    prompt_ids: list
    max_tokens: int
    policy: object  # a single-kind generate policy (Full, FixedExit, Confidence, Learned)
    family: str  # its family, for the cost model (full, fixed, confidence, learned)
    sink: Callable
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()  # stop strings
    top_logprobs: int | None = None  # alternatives per token to keep (None: no logprobs asked)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    # progress
    cancelled: bool = False
    tokens: list = dataclasses.field(default_factory=list)
    exit_layers: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)  # per token: (logprob, [(token, logprob)...]) or None
    text: str = ""
    sent: int = 0  # characters of `text` handed to the sink
    finish_reason: str | None = None
    # energy: joules of the windows shared with this job, and the methods they came from
    joules: float = 0.0
    energy_methods: set = dataclasses.field(default_factory=set)
    energy_unavailable: str | None = None
    # times (time.perf_counter)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def add_tokens(self, tokens, exits, logprobs, stop_ids, decode) -> bool:
        """Appends generated tokens until a stop token, max_tokens or a stop string; returns
        whether the job finished. `decode(ids) -> str`; a stop token is counted, not shown."""
        for token, layer, logprob in zip(tokens, exits, logprobs):
            self.tokens.append(int(token))
            self.exit_layers.append(int(layer))
            self.logprobs.append(logprob)
            if int(token) in stop_ids:
                self.finish_reason = STOP
                break
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = LENGTH
                break
        shown = self.tokens[:-1] if self.finish_reason == STOP and self.tokens[-1] in stop_ids else self.tokens
        self.text = decode(shown)
        if self.stop:
            cuts = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[:min(cuts)]
                self.finish_reason = STOP
        return self.finish_reason is not None

    def settled_text(self) -> str:
        """The text not yet handed out that no stop string or later token can change."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((len(s) - 1 for s in self.stop), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # a character still incomplete
                end -= 1
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta

    def add_energy(self, joules: float | None, method: str, reason: str | None = None):
        if joules is None:
            self.energy_unavailable = reason or "no energy figure"
        else:
            self.joules += joules
            self.energy_methods.add(method)
