"""Prometheus metrics of a server (vLLM's names under a `greencode:` prefix), one registry per
server, fed by the engine thread (`Observer`'s hooks) and the app (rejections).

Counted per sequence (a request with n choices or a list prompt is several), as vLLM counts its
sequence groups' requests. Ours besides vLLM's: `greencode:energy_joules_total{method}` and the
histogram `greencode:exit_layer` of every generated token's exit layer (0-based).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Observer:
    def __init__(self, model_name: str, num_layers: int, engine_state, energy_of):
        """`engine_state()` -> (running, waiting) sequences, read at each scrape; `energy_of(job)`
        -> a finished job's reply energy (serve/energy.py)."""
        self.registry = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": self.registry}
        self.model_name = model_name

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"greencode:{name}", doc, buckets=buckets, **label).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between a sequence's tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token")
        self.queue = histogram("request_queue_time_seconds", "Time waiting for a slot")
        self.exit_layer = histogram("exit_layer", "Exit layer (0-based) of each generated token",
                                    buckets=tuple(float(i) for i in range(num_layers)))
        self.prompt_tokens = Counter("greencode:prompt_tokens", "Prefilled prompt tokens", **label).labels(model_name)
        self.generation_tokens = Counter("greencode:generation_tokens", "Generated tokens", **label).labels(model_name)
        self.success = Counter("greencode:request_success", "Finished sequences by finish reason",
                               labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.rejected = Counter("greencode:request_rejected", "Requests refused (bad input, full queue)",
                                labelnames=["model_name", "status"], registry=self.registry)
        self.joules = Counter("greencode:energy_joules", "Joules of finished sequences by method",
                              labelnames=["model_name", "method"], registry=self.registry)
        running = Gauge("greencode:num_requests_running", "Sequences in a slot", **label)
        running.labels(model_name).set_function(lambda: engine_state()[0])
        waiting = Gauge("greencode:num_requests_waiting", "Sequences waiting for a slot", **label)
        waiting.labels(model_name).set_function(lambda: engine_state()[1])
        self._last_token: dict[int, float] = {}
        self._energy_of = energy_of

    # the engine thread's hooks
    def admitted(self, job):
        self.queue.observe(job.admitted - job.submitted)
        self.prompt_tokens.inc(len(job.prompt_ids))

    def tokens(self, job, count: int):
        now = time.perf_counter()
        if count <= 0:
            return
        last = self._last_token.get(job.id)
        if last is None:
            self.ttft.observe(now - job.submitted)
        else:
            for _ in range(count):  # a dispatch hands several tokens at once: its time shared
                self.itl.observe((now - last) / count)
        self._last_token[job.id] = now
        self.generation_tokens.inc(count)
        for layer in job.exit_layers[-count:]:
            self.exit_layer.observe(layer)

    def finished(self, job):
        self._last_token.pop(job.id, None)
        energy = self._energy_of(job)
        self.e2e.observe(job.finished - job.submitted)
        self.success.labels(self.model_name, job.finish_reason).inc()
        if energy["joules"] is not None:
            self.joules.labels(self.model_name, energy["method"]).inc(energy["joules"])

    def reject(self, status: int):
        self.rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
