"""GREEN-CODE's serving shape, for comparison (`serve.engine: sequential`, bench serve's baseline):
one request at a time, each one `generate` call, the reply whole at the end.

It is the batched Engine with one slot whose admission runs the whole generation: the same
queue, HTTP side, stop strings, energy windows and metrics, so a comparison of the two measures
the batching and nothing else. `generate` returns no logits, so it serves no logprobs.
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np

from greencode_jax.generate import generate
from greencode_jax.generate.sampling import Sampling
from greencode_jax.serve.engine import Engine
from greencode_jax.serve.protocol import RequestError


class SequentialEngine(Engine):
    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **{**kwargs, "slots": 1})

    def warm_up(self):
        """Nothing: generate compiles per (prompt bucket, policy kind) on first use."""

    def submit(self, jobs):
        if any(job.top_logprobs is not None for job in jobs):
            raise RequestError("logprobs: not served by serve.engine=sequential (generate returns no logits)",
                               param="logprobs")
        super().submit(jobs)

    def _admit(self, job, slot: int):
        job.admitted = time.perf_counter()
        sampling = Sampling(temperature=job.temperature, top_p=job.top_p)
        key = jax.random.key(job.seed if job.seed is not None else job.id)
        self.energy.begin()
        out = generate(self.model, np.asarray([job.prompt_ids], np.int32), max_new_tokens=job.max_tokens,
                       policy=job.policy, sampling=sampling, key=None if sampling.greedy else key,
                       stop_tokens=tuple(sorted(self.stop_ids)))
        n = int(out.lengths[0])
        tokens, exits = np.asarray(out.tokens[0, :n]), np.asarray(out.exit_layers[0, :n])
        self.energy.end([job], [int((exits + 1).sum())])
        if self.observer is not None:
            self.observer.admitted(job)
        self._add_tokens(job, tokens, exits, itertools.repeat(None))
        self._finish(job, job.finish_reason or "length")
