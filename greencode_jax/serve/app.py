"""The HTTP side: FastAPI routes over the engine.

    POST /v1/completions   OpenAI's completions (vLLM's schema) plus `policy` and `threshold`
    GET  /v1/models        the one model served
    GET  /health           200 while the engine runs, 503 after it failed
    GET  /metrics          Prometheus text

A request becomes one engine job per (prompt, choice); the engine thread hands each job's
text to an asyncio queue of the request. Bad input is OpenAI's error JSON with status 400,
a full queue 429; a client that goes away cancels its jobs, which frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from greencode_jax.errors import GreencodeError
from greencode_jax.serve import replies
from greencode_jax.serve.engine import QueueFull
from greencode_jax.serve.jobs import Job
from greencode_jax.serve.metrics import CONTENT_TYPE
from greencode_jax.serve.protocol import RequestError, parse_request

DISCONNECT_POLL_S = 0.25


def create_app(served, engine, observer, settings) -> FastAPI:
    app = FastAPI(title="greencode serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_, error: RequestError):
        observer.reject(error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse({"status": "failed", "reason": repr(engine.failure)}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting, "slots": engine.slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "greencode", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    async def metrics():
        return Response(observer.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request):
        if engine.failure is not None:
            raise RequestError(f"the engine stopped: {engine.failure!r}", status=503, kind="server_error")
        body = parse_request(await request.body(), max_n=settings.max_n, default_temperature=settings.temperature)
        events: asyncio.Queue = asyncio.Queue()
        entries, prompt_tokens = _jobs(body, served, engine, _sink(asyncio.get_running_loop(), events))
        try:
            engine.submit([job for _, job, _ in entries])
        except QueueFull as error:
            raise RequestError(str(error), status=429, kind="rate_limit_exceeded", code="queue_full") from None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        reply = (request_id, created, body.model or served.name)
        if body.stream:
            return StreamingResponse(_stream(reply, entries, events, body, served, engine, prompt_tokens),
                                     media_type="text/event-stream")
        await _until_done(request, entries, events, engine)
        return replies.completion(*reply, entries, body, served, prompt_tokens)

    return app


def _sink(loop, events: asyncio.Queue):
    def sink(job, event, payload):  # on the engine thread
        loop.call_soon_threadsafe(events.put_nowait, (job, event, payload))
    return sink


def _jobs(body, served, engine, sink):
    """(choice index, job, echo text) per (prompt, choice), and the prompts' token count."""
    try:
        policy, family, _ = served.policies.resolve(body.policy, body.threshold)
    except GreencodeError as error:
        raise RequestError(str(error), "policy") from None
    entries, prompt_tokens = [], 0
    for p, prompt in enumerate(body.prompts):
        if body.suffix is not None:
            if not isinstance(prompt, str):
                raise RequestError("'suffix' needs a text prompt, not token ids", "suffix")
            try:
                prompt_ids = served.tokenizer.encode(served.fim_prompt(prompt, body.suffix))
            except GreencodeError as error:
                raise RequestError(str(error), "suffix") from None
        else:
            prompt_ids = list(prompt) if not isinstance(prompt, str) else served.tokenizer.encode(prompt)
        if any(not 0 <= t < served.model.config.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt {p}: a token id is outside the vocabulary", "prompt")
        try:
            engine.check(len(prompt_ids), body.max_tokens)
        except GreencodeError as error:
            raise RequestError(f"prompt {p}: {error}", "prompt") from None
        prompt_tokens += len(prompt_ids)
        echo = prompt if isinstance(prompt, str) else served.tokenizer.decode(prompt_ids)
        for c in range(body.n):
            seed = None if body.seed is None else body.seed + c
            job = Job(prompt_ids, body.max_tokens, policy, family, None, temperature=body.temperature,
                      top_p=body.top_p, seed=seed, stop=body.stop, top_logprobs=body.logprobs)
            job.sink = _bind(sink, job)
            entries.append((p * body.n + c, job, echo))
    return entries, prompt_tokens


def _bind(sink, job):
    return lambda event, payload: sink(job, event, payload)


async def _until_done(request: Request, entries, events: asyncio.Queue, engine):
    """Waits for every job, cancelling them all when the client goes away."""
    pending = {job.id for _, job, _ in entries}
    try:
        while pending:
            try:
                job, event, _ = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError
                continue
            if event == "done":
                pending.discard(job.id)
    finally:
        for _, job, _ in entries:
            if job.finished is None:
                engine.cancel(job)


async def _stream(reply, entries, events: asyncio.Queue, body, served, engine, prompt_tokens: int):
    """Server-sent events: a chunk per settled text, one with each choice's finish reason, the
    usage chunk when asked, then [DONE]. A client that goes away closes this generator."""
    index_of = {job.id: index for index, job, _ in entries}
    pending = set(index_of)
    try:
        if body.echo:
            for index, _, echo in entries:
                yield _event(replies.chunk(*reply, index, echo))
        while pending:
            job, event, payload = await events.get()
            index = index_of[job.id]
            if event == "delta":
                text, start, end = payload
                logprobs = replies.choice_logprobs(job, served, body.logprobs, start, end)
                yield _event(replies.chunk(*reply, index, text, logprobs=logprobs))
            else:
                pending.discard(job.id)
                yield _event(replies.chunk(*reply, index, "", replies.finish_reason(job)))
        if body.include_usage:
            jobs = [job for _, job, _ in entries]
            final = {**replies.chunk(*reply, 0, ""), "choices": [], "usage": replies.usage(jobs, prompt_tokens),
                     **replies.extras(jobs, served, served.model.config)}
            yield _event(final)
        yield "data: [DONE]\n\n"
    finally:
        for _, job, _ in entries:
            if job.finished is None:
                engine.cancel(job)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
