"""The JSON of replies: a completion, a streamed chunk, and our extra fields (energy, exits, metrics)."""

from __future__ import annotations

import time

from greencode_jax.serve.energy import reply_energy

OBJECT = "text_completion"


def choice_logprobs(job, served, count: int | None, start: int = 0, end: int | None = None,
                    offset: int = 0) -> dict | None:
    """OpenAI's legacy logprobs object for the job's tokens[start:end] (None unless asked)."""
    if count is None:
        return None
    decode = served.tokenizer.decode
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, (logprob, alternatives) in zip(job.tokens[start:end], job.logprobs[start:end]):
        text = decode([token])
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(logprob)
        # keyed by text, best first: of two tokens with one text (byte pieces), the likelier one's
        tops.append(dict(reversed([(decode([t]), lp) for t, lp in alternatives[:count]])) if count else None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def finish_reason(job) -> str | None:
    return job.finish_reason if job.finish_reason in ("stop", "length") else None


def extras(jobs, served, cost_config) -> dict:
    """energy, exits and metrics of a reply's jobs (summed or averaged over its choices)."""
    energies = [reply_energy(job, served.cost, cost_config) for job in jobs]
    methods = {e["method"] for e in energies}
    unavailable = [e for e in energies if e["joules"] is None]
    energy = {"joules": None if unavailable else sum(e["joules"] for e in energies),
              "method": "unavailable" if unavailable else ("measured" if methods == {"measured"} else "estimated"),
              "modelled_joules": None if any(e["modelled_joules"] is None for e in energies)
              else sum(e["modelled_joules"] for e in energies)}
    for key in ("reason", "note"):
        notes = sorted({e[key] for e in energies if e.get(key)})
        if notes:
            energy[key] = "; ".join(notes)
    layers = [layer for job in jobs for layer in job.exit_layers]
    exits = {"mean_layer": sum(layers) / len(layers) if layers else None,
             "layers_computed": sum(layer + 1 for layer in layers),
             "per_token": [job.exit_layers for job in jobs]}
    first = [job.first_token for job in jobs if job.first_token is not None]
    admitted = [job.admitted for job in jobs if job.admitted is not None]
    submitted = min(job.submitted for job in jobs)
    done = max(job.finished or time.perf_counter() for job in jobs)
    metrics = {"queue_ms": 1e3 * (min(admitted) - submitted) if admitted else None,
               "time_to_first_token_ms": 1e3 * (min(first) - submitted) if first else None,
               "generation_ms": 1e3 * (done - min(admitted)) if admitted else None}
    return {"energy": energy, "exits": exits, "metrics": metrics}


def usage(jobs, prompt_tokens: int) -> dict:
    completion = sum(len(job.tokens) for job in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion(request_id: str, created: int, model: str, entries, request, served, prompt_tokens: int) -> dict:
    """The whole reply; `entries` are (index, job, echo_text) per choice."""
    choices = []
    for index, job, echo in entries:
        prefix = echo if request.echo else ""
        choices.append({"text": prefix + job.text, "index": index, "finish_reason": finish_reason(job),
                        "logprobs": choice_logprobs(job, served, request.logprobs, offset=len(prefix))})
    jobs = [job for _, job, _ in entries]
    return {"id": request_id, "object": OBJECT, "created": created, "model": model, "choices": choices,
            "usage": usage(jobs, prompt_tokens), **extras(jobs, served, served.model.config)}


def chunk(request_id: str, created: int, model: str, index: int, text: str, reason=None, logprobs=None) -> dict:
    return {"id": request_id, "object": OBJECT, "created": created, "model": model,
            "choices": [{"text": text, "index": index, "finish_reason": reason, "logprobs": logprobs}]}
