"""The OpenAI completions request as vLLM accepts it, checked field by field.

`parse_request(body, limits)` returns a `CompletionRequest` or raises `RequestError` with the
message, the offending field (`param`) and the HTTP status, which the app turns into OpenAI's
error JSON. Unknown fields are ignored, as vLLM ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import math

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 5


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple  # each a str or a tuple of token ids
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    policy: str | None = None
    threshold: float | None = None
    model: str | None = None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body, name, default, low, high, *, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"'{name}' must be in {bracket}{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(body, name, default, low, high=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        limit = f" and at most {high}" if high is not None else ""
        raise RequestError(f"'{name}' must be at least {low}{limit}, got {value}", name)
    return value


def _boolean(body, name) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _prompts(value) -> tuple:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return tuple(value)
        if all(_is_int(t) for t in value):
            return (tuple(value),)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return tuple(tuple(p) for p in value)
    raise RequestError("'prompt' must be a string, a list of strings, or token ids (a list of integers or of "
                       f"lists of integers), got {str(value)[:80]!r}", "prompt")


def _stop(value) -> tuple:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a non-empty string or a list of them, got {value!r}", "stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return tuple(stops)


def parse_request(raw: bytes, *, max_n: int, default_temperature: float) -> CompletionRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    if "prompt" not in body:
        raise RequestError("'prompt' is required", "prompt")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    for name in ("suffix", "policy", "model"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"'{name}' must be a string, got {body[name]!r}", name)
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options")
    return CompletionRequest(
        prompts=_prompts(body["prompt"]), max_tokens=_integer(body, "max_tokens", 16, 1),
        temperature=_number(body, "temperature", default_temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), n=_integer(body, "n", 1, 1, max_n),
        stop=_stop(body.get("stop")), seed=_integer(body, "seed", None, 0, 2**31 - 1),
        stream=_boolean(body, "stream"), include_usage=include_usage,
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS), echo=_boolean(body, "echo"),
        suffix=body.get("suffix"), policy=body.get("policy"), threshold=_number(body, "threshold", None, 0.0, 1.0),
        model=body.get("model"))
