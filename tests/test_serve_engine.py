"""The serving engine: requests decoded together in slots, each with its own policy, equal
`generate` run alone on that prompt with that policy (greedy); stops, cancellation, a full queue.

generate is the reference here: it is pinned against a cache-free reference and HF in the
generate tests. Batched and alone are different programs (batch of slots vs batch 1, another
cache length), so logits may differ by float rounding; the greedy tokens and exit layers are
compared exactly, on thresholds kept away from the decisions' statistics (a flip would show as
a different exit layer, and the test would name the request).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import jax
import numpy as np
import pytest

import greencode_jax as gc
from greencode_jax.data.tokenizer import load_tokenizer
from greencode_jax.serve.engine import Engine, QueueFull
from greencode_jax.serve.jobs import CANCELLED, LENGTH, STOP, Job
from serve_helpers import served_model_dir  # noqa: F401 (fixture)

P = gc.policies
SLOTS = 4
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def served(served_model_dir):
    model = gc.load_pretrained(served_model_dir, scan_layers=False)
    tokenizer = load_tokenizer(served_model_dir)
    params = P.Learned.init_params(jax.random.key(3), model.config.hidden_size)
    params["layers"][-1]["w"] = params["layers"][-1]["w"] * 3.0  # spread P(exit) away from 0.5
    learned = P.Learned(params, 0.5)
    return model, tokenizer, learned


@pytest.fixture(scope="module")
def engine(served):
    model, tokenizer, learned = served
    engine = Engine(model, tokenizer, slots=SLOTS, max_context=200, max_queue=24, tokens_per_step=3, learned=learned)
    engine.start()
    yield engine
    engine.stop()
    assert not engine._thread.is_alive()


class Collector:
    """A job's sink: its deltas and the done event, waited on with a bound."""

    def __init__(self):
        self.events = queue.Queue()
        self.done = threading.Event()
        self.deltas = []

    def __call__(self, event, payload):
        if event == "delta":
            self.deltas.append(payload[0])
        else:
            self.done.set()


def job_for(prompt, policy, family, max_tokens, **kwargs):
    sink = Collector()
    return Job(list(prompt), max_tokens, policy, family, sink, **kwargs), sink


def wait(sinks):
    deadline = time.monotonic() + TIMEOUT_S
    for sink in sinks:
        assert sink.done.wait(max(0.0, deadline - time.monotonic())), "a job did not finish in time"


def prompts(tokenizer, count, longest=60):
    source = "\n".join(f"def f{i}(x, y):\n    return x * {i} + y - {i * i}\n" for i in range(40))
    ids = tokenizer.encode(source)
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, longest, count)
    starts = rng.integers(1, len(ids) - 100, count)
    return [ids[:1] + ids[s:s + n] for s, n in zip(starts, lengths)]


@pytest.mark.parametrize("longest, most_tokens", [
    (60, 16),  # one prompt bucket and one output bucket: generate compiles once per policy kind
    pytest.param(90, 22, marks=pytest.mark.slow),  # two of each
])
def test_sixteen_requests_in_a_busy_batch_each_equal_generate_alone(engine, served, longest, most_tokens):
    model, tokenizer, learned = served
    choices = [(P.Full(), "full"), (P.FixedExit(1), "fixed"), (P.FixedExit(2), "fixed"),
               (P.Confidence(0.05), "confidence"), (P.Confidence(0.12), "confidence"),
               (dataclasses.replace(learned, threshold=0.3), "learned"),
               (dataclasses.replace(learned, threshold=0.7), "learned"), (P.Confidence(0.03, measure="top2_margin"),
                                                                          "confidence")]
    jobs, sinks = [], []
    for i, prompt in enumerate(prompts(tokenizer, 16, longest)):
        policy, family = choices[i % len(choices)]
        job, sink = job_for(prompt, policy, family, max_tokens=int(6 + (i * 5) % (most_tokens - 5)))
        jobs.append(job)
        sinks.append(sink)
    engine.submit(jobs)
    wait(sinks)
    exits_seen = set()
    for i, job in enumerate(jobs):
        alone = model.generate(np.asarray(job.prompt_ids)[None], max_new_tokens=job.max_tokens, policy=job.policy)
        n = int(alone.lengths[0])
        what = f"request {i} ({job.policy}, prompt {len(job.prompt_ids)} tokens)"
        assert job.tokens == np.asarray(alone.tokens[0, :n]).tolist(), what
        assert job.exit_layers == np.asarray(alone.exit_layers[0, :n]).tolist(), what
        assert job.finish_reason == (STOP if n < job.max_tokens or job.tokens[-1] in engine.stop_ids else LENGTH)
        assert "".join(sinks[i].deltas) == job.text
        exits_seen.update((job.family, e) for e in job.exit_layers[1:])
    # the batch really mixed early exits with full-depth tokens
    assert {e for _, e in exits_seen} >= {1, 2, 3} and ("learned", 3) in exits_seen
    assert engine.running == 0 and engine.waiting == 0


def test_stop_string_cancellation_and_a_full_queue(engine, served):
    _, tokenizer, _ = served
    prompt = prompts(tokenizer, 1)[0]
    probe, sink = job_for(prompt, P.Full(), "full", max_tokens=12)
    engine.submit([probe])
    wait([sink])
    stop = probe.text[3:6]
    assert len(stop) == 3 and probe.finish_reason == LENGTH
    stopped, sink = job_for(prompt, P.Full(), "full", max_tokens=12, stop=(stop,))
    engine.submit([stopped])
    wait([sink])
    assert stopped.finish_reason == STOP and stopped.text == probe.text[:probe.text.index(stop)]
    assert "".join(sink.deltas) == stopped.text  # nothing past the stop string was ever sent

    long_jobs = [job_for(prompt, P.Full(), "full", max_tokens=100) for _ in range(24)]
    engine.submit([j for j, _ in long_jobs])  # 24: the queue's size
    extra = [job_for(prompt, P.Full(), "full", max_tokens=100)[0] for _ in range(SLOTS + 1)]
    with pytest.raises(QueueFull):  # at most SLOTS of the 24 have left the queue: 5 more never fit
        engine.submit(extra)
    for job, _ in long_jobs:
        engine.cancel(job)
    wait([s for _, s in long_jobs])
    assert all(j.finish_reason == CANCELLED for j, _ in long_jobs)
    assert engine.running == 0 and engine.waiting == 0
    again, sink = job_for(prompt, P.Full(), "full", max_tokens=12)  # the engine still serves, the same answer
    engine.submit([again])
    wait([sink])
    assert again.tokens == probe.tokens
