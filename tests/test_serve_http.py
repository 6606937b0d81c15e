"""`greencode serve` over HTTP: one live server on 127.0.0.1 (a free port) for the module,
driven by the real `openai` client and by httpx with the request shapes IDE clients send.

Expected completions come from `generate` run alone on the same prompt and policy (greedy),
decoded with the tokenizer; the engine's own test pins tokens and exit layers one by one.
"""

from __future__ import annotations

import json

import httpx
import jax
import numpy as np
import openai
import pytest

import greencode_jax as gc
from greencode_jax.config.serve import ServeSection
from greencode_jax.energy.meter import EnergyMeter
from greencode_jax.serve.loading import load_served
from greencode_jax.serve.server import Server
from serve_helpers import served_model_dir  # noqa: F401 (fixture)

P = gc.policies
CERTIFIED_LEARNED = 0.4
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def server(served_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_policy")
    model = gc.load_pretrained(served_model_dir, scan_layers=False)
    params = P.Learned.init_params(jax.random.key(3), model.config.hidden_size)
    params["layers"][-1]["w"] = params["layers"][-1]["w"] * 3.0
    P.Learned(params, 0.5, exit_layers=tuple(model.config.exit_layers)).save(root / "policy")
    # a `greencode run` writes certify.json next to the policy: learned certified, confidence never exits
    (root / "certify.json").write_text(json.dumps({"families": {"learned": {"certified": CERTIFIED_LEARNED},
                                                                "confidence": {"certified": None}}}))
    served = load_served(served_model_dir, policy_dir=root / "policy", allow_foreign_policy=True)
    section = ServeSection(port=0, slots=4, max_context=256, max_queue=12, max_n=3, tokens_per_step=3)
    with Server(served, section, EnergyMeter()).in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def expected(server, prompt: str, policy, max_tokens: int):
    """(text, exit layers) of generate alone, as the server decodes text (special tokens left out)."""
    served = server.served
    ids = served.tokenizer.encode(prompt)
    out = served.model.generate(np.asarray(ids)[None], max_new_tokens=max_tokens, policy=policy)
    n = int(out.lengths[0])
    return server.engine.decode(np.asarray(out.tokens[0, :n])), np.asarray(out.exit_layers[0, :n]).tolist()


def test_completion_list_prompt_and_n_with_the_openai_client(server, client):
    reply = client.completions.create(model="tiny-llama", prompt=["def add(a, b):", "class Stack:"], max_tokens=9,
                                      n=2, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    learned = server.served.policies.resolve(None, None)[0]  # the default: learned at the certified threshold
    assert learned.threshold == CERTIFIED_LEARNED
    for prompt, choices in (("def add(a, b):", reply.choices[:2]), ("class Stack:", reply.choices[2:])):
        text, _ = expected(server, prompt, learned, 9)
        assert [c.text for c in choices] == [text, text]
    extra = reply.model_extra
    assert reply.usage.completion_tokens == sum(len(e) for e in extra["exits"]["per_token"])
    assert extra["energy"]["method"] == "estimated" and extra["energy"]["joules"] > 0
    assert extra["metrics"]["time_to_first_token_ms"] >= extra["metrics"]["queue_ms"] >= 0


def test_extra_fields_choose_the_policy_per_request(server, client):
    prompt = "import os\n"
    fixed = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"policy": "fixed:1"})
    assert fixed.model_extra["exits"]["per_token"] == [[3, 1, 1, 1, 1, 1]]  # the first token: the prompt's pass
    assert fixed.choices[0].text == expected(server, prompt, P.FixedExit(1), 6)[0]
    confident = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body={"policy": "confidence", "threshold": 0.08})
    text, exits = expected(server, prompt, P.Confidence(0.08), 6)
    assert confident.choices[0].text == text and confident.model_extra["exits"]["per_token"] == [exits]
    never = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"policy": "confidence"})  # certified: none, so never exits
    assert never.model_extra["exits"]["per_token"] == [[3, 3, 3, 3]]


def test_stop_and_streaming_with_usage(server, client):
    prompt = "for i in range(10):"
    full, _ = expected(server, prompt, P.Full(), 12)
    stop = full[4:6]
    assert len(stop) == 2
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                      extra_body={"policy": "full"})
    assert reply.choices[0].text == full[:full.index(stop)] and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"policy": "full"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.model_extra["energy"]["joules"] > 0 and len(last.model_extra["exits"]["per_token"][0]) == 12


def test_ide_request_shapes(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        # Continue: a raw prompt holding the model's FIM tokens, stream: true, stop strings
        raw = "<fim_prefix>def f(x):\n    <fim_suffix>\n    return y<fim_middle>"
        body = {"model": "m", "prompt": raw, "max_tokens": 8, "temperature": 0, "stream": True, "stop": ["\n\n"],
                "policy": "full"}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        # Tabby: prompt + suffix, stream: true: the server builds the same FIM prompt
        body = {"model": "m", "prompt": "def f(x):\n    ", "suffix": "\n    return y", "max_tokens": 8,
                "temperature": 0, "stream": True, "stop": ["\n\n"], "policy": "full"}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
        assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == streamed
        # llm-ls: its own prompt, stream: false
        reply = http.post("/v1/completions", json={"model": "m", "prompt": raw, "stream": False, "max_tokens": 8,
                                                   "temperature": 0, "policy": "full", "stop": ["\n\n"]}).json()
        assert reply["choices"][0]["text"] == streamed
        assert http.get("/v1/models").json()["data"][0]["id"] == server.served.name


BAD = [  # (body, param), each answered 400 with OpenAI's error JSON
    (b"{not json", None), (b"[1, 2]", None), ({"max_tokens": 3}, "prompt"), ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "max_tokens": "9"}, "max_tokens"),
    ({"prompt": "x", "policy": "greedy"}, "policy"), ({"prompt": "x", "policy": "fixed:2,3"}, "policy"),
    ({"prompt": "x", "threshold": 1.5}, "threshold"), ({"prompt": "x", "n": 4}, "n"),
    ({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x " * 300}, "prompt"), ({"prompt": "x", "max_tokens": 300}, "prompt"),
    ({"prompt": [[1, 99999]]}, "prompt"), ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
]


def _post(http, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post("/v1/completions", content=content, headers={"content-type": "application/json"})


def test_bad_requests_get_openai_error_json(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        for body, param in BAD:
            response = _post(http, body)
            assert response.status_code == 400, body
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], body


def test_logprobs_and_echo(server, client):
    reply = client.completions.create(model="m", prompt="x = 1", max_tokens=4, temperature=0, logprobs=2, echo=True,
                                      extra_body={"policy": "full"})
    choice = reply.choices[0]
    assert choice.text.startswith("x = 1")
    lp = choice.logprobs
    # top_logprobs are keyed by text (OpenAI's format): byte pieces of one character all read '\ufffd'
    assert len(lp.tokens) == 4 and all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the top one
    assert lp.text_offset[0] == len("x = 1")


def _wait_idle(engine, seconds=60.0):
    import time

    deadline = time.monotonic() + seconds
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.running == 0 and engine.waiting == 0


def test_faults_bad_requests_disconnects_and_a_full_queue_leave_every_slot_free(server):
    import concurrent.futures

    prompt = "while True:"
    want, _ = expected(server, prompt, P.Full(), 5)
    good = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "policy": "full"}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        def one(i):
            if i % 20 == 0:
                return _post(http, good).json()["choices"][0]["text"] == want
            return _post(http, BAD[i % len(BAD)][0]).status_code == 400

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert all(pool.map(one, range(200)))

    # a full queue: A's 12 sequences take the 4 slots and 8 places of 12; B's 12 more never fit (A's
    # 200-token sequences cannot finish in the moment between the two), so B gets 429 at once
    long = {"prompt": [prompt, "x = 1", "y = 2", "z = 3"], "n": 3, "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        with http.stream("POST", "/v1/completions", json=long) as first:
            assert first.status_code == 200
            refused = _post(http, long)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            next(first.iter_lines())  # mid-stream, then the client goes away

    def hang_up(_):  # more clients that go away mid-stream
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            with http.stream("POST", "/v1/completions", json={**long, "prompt": prompt, "n": 1}) as response:
                lines = response.iter_lines()
                return response.status_code == 200 and next(lines).startswith("data: ")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(hang_up, range(6)))
    assert _wait_idle(server.engine), "a disconnected client's job still holds a slot"
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        assert _post(http, good).json()["choices"][0]["text"] == want
        metrics = http.get("/metrics").text
    assert 'greencode:request_rejected_total{model_name="tiny-llama",status="429"}' in metrics
    assert 'greencode:request_success_total{finished_reason="cancelled",model_name="tiny-llama"}' in metrics
    assert "greencode:exit_layer_bucket" in metrics and 'greencode:energy_joules_total{method="estimated"' in metrics
    assert server.engine.running == 0 and server.engine.waiting == 0


def test_the_sequential_engine_serves_what_the_batched_one_does(server):
    """serve.engine=sequential (bench serve's baseline, GREEN-CODE's shape): the same HTTP side over
    one generate per request; its replies equal the batched engine's, and it refuses logprobs."""
    section = ServeSection(port=0, slots=4, max_context=256, max_queue=12, engine="sequential")
    body = {"prompt": "def add(a, b):", "max_tokens": 7, "temperature": 0}
    with Server(server.served, section, EnergyMeter()).in_thread() as sequential:
        with httpx.Client(timeout=TIMEOUT) as http:
            for policy in ("full", "fixed:1", "learned"):
                replies = [http.post(s.url + "/v1/completions", json={**body, "policy": policy}).json()
                           for s in (server, sequential)]
                batched, alone = replies
                assert alone["choices"][0]["text"] == batched["choices"][0]["text"]
                assert alone["exits"]["per_token"] == batched["exits"]["per_token"]
                assert alone["usage"] == batched["usage"]
                assert alone["energy"]["joules"] > 0
            refused = http.post(sequential.url + "/v1/completions", json={**body, "logprobs": 1})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
