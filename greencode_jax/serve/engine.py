"""The serving engine: a thread that keeps a fixed number of slots decoding (continuous batching).

    engine = Engine(model, tokenizer, slots=8, max_context=1024, max_queue=64)
    engine.start()
    engine.submit([job, ...])   # raises QueueFull at once when the queue has no room
    ...
    engine.stop()

Each iteration admits waiting jobs into free slots (prefill + insert, serve/batch.py), then
runs one dispatch of `tokens_per_step` decode steps over every slot, each slot with its own
policy (generate.row_policy.PerRow), hands each job its tokens, and frees the slots of jobs
that finished (stop token, stop string, max_tokens) or were cancelled (client gone). The
energy meter's window around each dispatch is split among the jobs active in it in proportion
to the layers each computed (serve/energy.py).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.errors import GreencodeError
from greencode_jax.generate import PROMPT_BUCKET
from greencode_jax.generate.policies import Full
from greencode_jax.generate.row_policy import CONFIDENCE_MARGIN, CONFIDENCE_MAX, PerRow, row_kind
from greencode_jax.serve.batch import Settings, admit_jit, empty_slots, step_jit
from greencode_jax.serve.energy import StepEnergy
from greencode_jax.serve.jobs import CANCELLED, Job


class QueueFull(Exception):
    """The request queue has no room: the server answers 429 at once."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    def __init__(self, model, tokenizer, *, slots: int, max_context: int, max_queue: int, tokens_per_step: int = 4,
                 learned=None, meter=None, observer=None):
        """`learned`: the loaded Learned policy whose actor learned rows share (None: no learned
        rows allowed). `meter`: an EnergyMeter (None: energy unavailable). `observer`: an object
        with `admitted(job)`, `tokens(job, n)`, `finished(job)` (serve/metrics.py), or None."""
        config = model.config
        if config.scan_layers:
            model.set_scan_layers(False)
        if max_context > config.max_position_embeddings:
            raise GreencodeError(f"max_context={max_context} exceeds the model's {config.max_position_embeddings} "
                                 "positions")
        self.model, self.tokenizer, self.learned = model, tokenizer, learned
        self.slots, self.max_context, self.max_queue = slots, max_context, max_queue
        self.tokens_per_step = tokens_per_step
        self.stop_ids = set(_eos_ids(config, tokenizer))
        self.is_stop = jnp.zeros(config.vocab_size, bool).at[jnp.asarray(sorted(self.stop_ids) or [0])].set(
            bool(self.stop_ids))
        # a prompt padded to its bucket, plus max_tokens, plus the steps of one dispatch past a stop
        self.cache_len = _round_up(max_context, PROMPT_BUCKET) + PROMPT_BUCKET + tokens_per_step
        self.energy = StepEnergy(meter)
        self.observer = observer
        self._device = empty_slots(model, slots, self.cache_len)
        self._jobs: list[Job | None] = [None] * slots
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting: list[Job] = []
        self._settings_cache = None
        self.failure: BaseException | None = None

    # ---- the client side (any thread) ----

    def submit(self, jobs: list[Job]):
        """Queues `jobs` (all or none); QueueFull when the queue lacks room for them."""
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.extend(jobs)
            self._wake.notify()

    def cancel(self, job: Job):
        """Frees `job`'s slot at the engine's next iteration (a client that went away)."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def decode(self, ids) -> str:
        """Text of generated ids, special tokens left out (as vLLM's skip_special_tokens)."""
        backend = self.tokenizer._backend
        return backend.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(job is not None for job in self._jobs)

    def check(self, prompt_len: int, max_tokens: int):
        """Raises GreencodeError when a prompt of `prompt_len` tokens plus max_tokens cannot fit."""
        if prompt_len < 1:
            raise GreencodeError("the prompt is empty (no tokens)")
        if prompt_len + max_tokens > self.max_context:
            raise GreencodeError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds this "
                                 f"server's context of {self.max_context} tokens")

    def warm_up(self):
        """Compiles the step for each bucket of active slots and the first prompt bucket's admission
        before the first request, so no client waits for those compiles. Call before `start`."""
        ids = jnp.zeros((1, PROMPT_BUCKET), jnp.int32)
        valid = jnp.ones((1, PROMPT_BUCKET), bool)
        self._device, _ = admit_jit(self.model, self._device, ids, valid, jnp.int32(0), jnp.float32(0),
                                    jnp.float32(1), jax.random.key(0), jnp.bool_(False))
        settings = self._settings()
        # every bucket of active slots (the variant with exit logits compiles on first use)
        for size in sorted({_bucket(n, self.slots) for n in range(1, self.slots + 1)}):
            self._device, out = step_jit(self.model, self._device, settings, self.is_stop,
                                         jnp.arange(size, dtype=jnp.int32), tokens=self.tokens_per_step)
        jax.block_until_ready(out)

    # ---- the engine thread ----

    def start(self):
        self._thread = threading.Thread(target=self._run, name="greencode-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        """Cancels every job and stops the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self):
        try:
            while not self._stopping:
                self._admit_waiting()
                if not any(self._jobs):
                    with self._wake:
                        if not self._pending and not self._stopping:
                            self._wake.wait(0.5)
                    continue
                self._step()
        except BaseException as error:  # the server answers 503 from now on and says why
            self.failure = error
            raise
        finally:
            for job in [*self._pending, *(j for j in self._jobs if j is not None), *self._admitting]:
                self._finish(job, CANCELLED)
            self._pending.clear()
            self._jobs = [None] * self.slots

    def _admit_waiting(self):
        while None in self._jobs:
            with self._wake:
                if not self._pending:
                    return
                job = self._pending.popleft()
            if job.cancelled:
                self._finish(job, CANCELLED)
                continue
            self._admitting = [job]  # finished by _run's cleanup should the admission fail
            self._admit(job, self._jobs.index(None))
            self._admitting = []

    def _admit(self, job: Job, slot: int):
        job.admitted = time.perf_counter()
        n = len(job.prompt_ids)
        padded = _round_up(n, PROMPT_BUCKET)
        ids = np.zeros((1, padded), np.int32)
        ids[0, padded - n:] = job.prompt_ids
        valid = np.zeros((1, padded), bool)
        valid[0, padded - n:] = True
        rng = jax.random.key(job.seed if job.seed is not None else job.id)
        self.energy.begin()
        self._device, out = admit_jit(self.model, self._device, jnp.asarray(ids), jnp.asarray(valid),
                                      jnp.int32(slot), jnp.float32(job.temperature), jnp.float32(job.top_p), rng,
                                      jnp.bool_(bool(job.top_logprobs)))
        out = jax.device_get(out)
        self.energy.end([job], [self.model.config.num_layers])
        self._jobs[slot] = job
        self._settings_cache = None
        if self.observer is not None:
            self.observer.admitted(job)
        self._deliver(slot, job, out, 0)

    def _step(self):
        settings = self._settings()
        active = [(slot, job) for slot, job in enumerate(self._jobs) if job is not None]
        free = [slot for slot, job in enumerate(self._jobs) if job is None]
        rows = [slot for slot, _ in active] + free[:_bucket(len(active), self.slots) - len(active)]
        self.energy.begin()
        self._device, out = step_jit(self.model, self._device, settings, self.is_stop, jnp.asarray(rows, jnp.int32),
                                     tokens=self.tokens_per_step)
        out = jax.device_get(out)
        kept = [self._deliver(slot, job, out, row) for row, (slot, job) in enumerate(active)]
        self.energy.end([job for _, job in active], [sum(e + 1 for e in exits) for exits in kept])

    def _deliver(self, slot: int, job: Job, out, row: int) -> list:
        """Hands `job` row `row` of a StepOutput; frees its slot when it finished. Returns the exit
        layers of the tokens it kept (what its share of the window's energy is counted from)."""
        if job.cancelled:
            self._release(slot, job, CANCELLED)
            return []
        before = len(job.tokens)
        count = job.top_logprobs
        logprobs = (itertools.repeat(None) if count is None else  # built only for a request that asked
                    [(float(lp), list(zip(ids[:count].tolist(), tops[:count].tolist())))
                     for lp, ids, tops in zip(out.logprobs[row], out.top_ids[row], out.top_logprobs[row])])
        done = self._add_tokens(job, out.tokens[row], out.exit_layers[row], logprobs)
        if done:
            self._release(slot, job, job.finish_reason)
        return job.exit_layers[before:]

    def _add_tokens(self, job: Job, tokens, exit_layers, logprobs) -> bool:
        """Appends tokens to `job` and hands its client the text they settled; returns whether it finished."""
        before = len(job.tokens)
        done = job.add_tokens(tokens, exit_layers, logprobs, self.stop_ids, self.decode)
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if self.observer is not None:
            self.observer.tokens(job, len(job.tokens) - before)
        delta = job.settled_text()
        if delta:
            job.sink("delta", (delta, before, len(job.tokens)))
        return done

    def _release(self, slot: int, job: Job, reason: str):
        self._jobs[slot] = None
        self._settings_cache = None
        self._finish(job, reason)

    def _finish(self, job: Job, reason: str):
        if job.finished is not None:
            return
        job.finish_reason = job.finish_reason or reason
        if reason == CANCELLED:
            job.finish_reason = CANCELLED
        job.finished = time.perf_counter()
        if self.observer is not None:
            self.observer.finished(job)
        job.sink("done", None)

    def _settings(self) -> Settings:
        """The slots' per-row settings on the device, rebuilt only when a slot changed."""
        if self._settings_cache is None:
            policies = [job.policy if job is not None else Full() for job in self._jobs]
            confidence = any(row_kind(p) in (CONFIDENCE_MAX, CONFIDENCE_MARGIN) for p in policies)
            params = None if self.learned is None else self.learned.params
            rows = PerRow.of(policies, learned_params=params, needs_logits=confidence)
            if params is not None:  # the same pytree whether or not a learned row is active: one compile
                rows = PerRow(rows.kinds, rows.thresholds, rows.layers, params, needs_logits=confidence)
            self._settings_cache = Settings(
                rows, jnp.asarray([j.temperature if j else 0.0 for j in self._jobs], jnp.float32),
                jnp.asarray([j.top_p if j else 1.0 for j in self._jobs], jnp.float32),
                jnp.asarray([j is not None for j in self._jobs]),
                jnp.bool_(any(j is not None and bool(j.top_logprobs) for j in self._jobs)))
        return self._settings_cache


def _bucket(active: int, slots: int) -> int:
    """The rows a step computes for `active` slots: the next power of two, at most every slot."""
    return min(1 << max(active - 1, 0).bit_length(), slots)


def _eos_ids(config, tokenizer) -> list[int]:
    eos = config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not ids and tokenizer.eos_id is not None:
        ids = [tokenizer.eos_id]
    return ids
