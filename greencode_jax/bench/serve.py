"""`greencode bench serve [CHECKPOINT]`: the completion server under load against a
GREEN-CODE-shaped baseline (one request at a time, one `generate` each), on the same model.

The server runs as `greencode serve` in a subprocess (so its energy windows count its own CPU
time, not the load generator's); the load generator streams requests over loopback at each
concurrency (a bounded number of requests, each with its own prompt), and reads requests/s,
output tokens/s, time to first token and inter-token latency (p50, p99) and joules per token
(the replies' `energy`). The baseline is the same server with `serve.engine=sequential`: one
request at a time, one `generate` each, the reply whole at the end (GREEN-CODE's endpoint), under
the same load at concurrency 16 through the same HTTP side; its time to first token is the whole
generation. A reference row runs `generate` in this process, request by request, without HTTP:
the floor of the baseline on this machine.

Without CHECKPOINT: the quickstart's model shape (8-layer Llama, hidden 128, exits 1, 3, 5, 7)
at random weights with a byte-level BPE of 2048 tokens trained on Python's standard library,
built in a temporary directory. Without --policy every request runs a policy cycled over full
and two fixed exits (at a third and two thirds of the model's exits: fixed:3 and fixed:5 on the
quickstart's shape; random weights never reach a confidence threshold); with --policy DIR every
request runs `learned` at its default (certified) threshold. The same on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from greencode_jax.convert import load_pretrained, save_checkpoint
from greencode_jax.data.tokenizer import train_bpe
from greencode_jax.energy.meter import EnergyMeter
from greencode_jax.errors import GreencodeError
from greencode_jax.eval.joules import measured_entry, metered_devices
from greencode_jax.serve.loading import load_served

QUICKSTART_EXITS = (1, 3, 5, 7)
CONCURRENCY = (1, 4, 16)
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600


def quickstart_model(out: Path) -> Path:
    """The quickstart's model shape at random weights, with a BPE trained on the stdlib, saved as
    a greencode checkpoint with the quickstart's exits."""
    import torch
    import transformers


    tokenizer = train_bpe(_stdlib_texts(200), 2048)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    hf_dir = out / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    return save_checkpoint(load_pretrained(hf_dir, exit_layers=QUICKSTART_EXITS, scan_layers=False), out / "model")


def _stdlib_texts(count: int) -> list[str]:
    root = Path(os.__file__).parent
    return [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:count]]


def prompts(tokenizer, count: int, max_prompt: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of 16..max_prompt tokens cut from the stdlib's source."""
    ids = tokenizer.encode("\n".join(_stdlib_texts(40)))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, max_prompt + 1, count)
    starts = rng.integers(1, len(ids) - max_prompt - 1, count)
    return [[int(i) for i in ids[:1] + ids[s:s + n - 1]] for s, n in zip(starts, lengths)]


def _latencies(tokens_per_s, ttft, gaps, joules_per_token, methods) -> dict:
    return {"output_tokens_per_s": tokens_per_s, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "joules_per_token": joules_per_token, "energy_method": "+".join(sorted(methods))}


def percentile(values, q: float):
    return float(np.percentile(values, q)) if values else None


async def _one(client, url: str, prompt, policy: str, max_tokens: int, count_tokens: bool = True) -> dict:
    """One streamed request. `count_tokens`: ask for logprobs (0 alternatives) to learn how many tokens
    each chunk holds (inter-token latency); without, only the first chunk's time is read."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "policy": policy, **({"logprobs": 0} if count_tokens else {})}
    start = time.perf_counter()
    first, gaps, last, final = None, [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise GreencodeError(f"bench serve: the server answered {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            now = time.perf_counter()
            if not data["choices"]:
                final = data
                continue
            tokens = len((data["choices"][0].get("logprobs") or {}).get("tokens") or [])
            if not count_tokens and first is None:
                first = now - start
            elif tokens:
                if first is None:
                    first = now - start
                    tokens -= 1
                elif tokens:
                    gaps += [(now - last) / tokens] * tokens
                last = now
    return {"ttft": first, "gaps": gaps, "tokens": final["usage"]["completion_tokens"],
            "joules": final["energy"]["joules"], "method": final["energy"]["method"]}


async def _load(url: str, jobs, concurrency: int, max_tokens: int, count_tokens: bool = True) -> tuple[list, float]:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        async def bounded(prompt, policy):
            async with limit:
                return await _one(client, url, prompt, policy, max_tokens, count_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p, policy) for p, policy in jobs))
        return results, time.perf_counter() - start


def _figures(results, wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    joules = [r["joules"] for r in results]
    methods = {r["method"] for r in results}
    return {"requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            **_latencies(tokens / wall, ttft, gaps, None if None in joules else sum(joules) / tokens, methods)}


def policy_cycle(exit_layers, learned: bool) -> tuple:
    """What the requests run, in turn (see the module's docstring)."""
    if learned:
        return ("learned",)
    early = [e for e in exit_layers if e != exit_layers[-1]]
    return ("full", *dict.fromkeys(f"fixed:{early[len(early) * k // 3]}" for k in (1, 2)))


def generate_alone(served, jobs, max_tokens: int, meter) -> dict:
    """The floor of the baseline: the same requests one at a time, one generate each, in this
    process without HTTP, each in an energy window."""
    import jax

    model, resolver = served.model, served.policies
    devices, reason = metered_devices(meter)
    for prompt, policy in jobs[:6]:  # compile every (policy kind, bucket) first
        jax.block_until_ready(model.generate(np.asarray(prompt)[None], max_new_tokens=max_tokens,
                                             policy=resolver.resolve(policy, None)[0]))
    ttft, gaps, tokens, joules, methods = [], [], 0, [], set()
    start = time.perf_counter()
    for prompt, policy in jobs:
        t0 = time.perf_counter()
        meter.begin("baseline")
        out = model.generate(np.asarray(prompt)[None], max_new_tokens=max_tokens,
                             policy=resolver.resolve(policy, None)[0])
        n = int(out.lengths[0])
        entry = measured_entry(meter.end("baseline", out), devices, 1, reason)
        seconds = time.perf_counter() - t0
        ttft.append(seconds)  # the reply comes whole, at the end
        gaps += [seconds / n] * n
        tokens += n
        joules.append(entry["joules"])
        methods.add(entry["method"])
    wall = time.perf_counter() - start
    return {"requests": len(jobs), "seconds": wall, "requests_per_s": len(jobs) / wall,
            **_latencies(tokens / wall, ttft, gaps, None if None in joules else sum(joules) / tokens, methods)}


@contextlib.contextmanager
def _server(checkpoint, slots: int, max_context: int, extra: list[str], log: Path):
    process, url = _start_server(checkpoint, slots, max_context, extra, log)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(60)


def _start_server(checkpoint, slots: int, max_context: int, extra: list[str], log: Path):
    import httpx

    command = [sys.executable, "-m", "greencode_jax.cli.main", "serve", str(checkpoint), "--port", "0", "--slots",
               str(slots), "--max-context", str(max_context), "--max-queue", "256", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    first = process.stdout.readline()
    if not first.startswith("greencode serve: http"):
        process.kill()
        raise GreencodeError(f"bench serve: the server did not start ({first.strip()}; see {log})")
    url = first.split()[2].rsplit("/v1/", 1)[0]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise GreencodeError(f"bench serve: the server at {url} never became healthy (see {log})")


def run_bench_serve(checkpoint=None, *, policy_dir=None, requests: int = 32, max_tokens: int = 32,
                    max_prompt: int = 120, slots: int = 16, overrides=(), progress=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="greencode-bench-serve-") as tmp:
        source = "the checkpoint " + str(checkpoint)
        if checkpoint is None:
            progress("building the quickstart's model shape at random weights (no CHECKPOINT given)")
            checkpoint = quickstart_model(Path(tmp))
            source = "the quickstart's model shape (8-layer Llama, hidden 128) at random weights"
        served = load_served(checkpoint, policy_dir=policy_dir)
        cycle = policy_cycle(served.model.config.exit_layers, policy_dir is not None)
        jobs = [(p, cycle[i % len(cycle)]) for i, p in enumerate(prompts(served.tokenizer, requests, max_prompt))]
        results = {"model": source, "requests": requests, "max_tokens": max_tokens, "slots": slots,
                   "policies": [served.policies.resolve(p, None)[2] for p in cycle], "concurrency": {}}
        extra = [*(["--policy", str(policy_dir)] if policy_dir else []), *overrides]
        # the context the load needs, no more: every step reads each slot's whole cache row
        context = max_prompt + max_tokens
        with _server(checkpoint, slots, context, extra, Path(tmp) / "server.log") as url:
            asyncio.run(_load(url, jobs[:6], 2, max_tokens))  # every prompt bucket compiled
            for concurrency in CONCURRENCY:
                progress(f"server, concurrency {concurrency}: {requests} requests")
                results["concurrency"][str(concurrency)] = _figures(*asyncio.run(_load(url, jobs, concurrency,
                                                                                       max_tokens)))
        progress(f"baseline: the same server one request at a time, one generate each, at concurrency "
                 f"{CONCURRENCY[-1]}: {requests} requests")
        with _server(checkpoint, 1, context, [*extra, "serve.engine=sequential"], Path(tmp) / "baseline.log") as url:
            asyncio.run(_load(url, jobs[:6], 1, max_tokens, count_tokens=False))  # every (bucket, kind) compiled
            results["baseline"] = _figures(*asyncio.run(_load(url, jobs, CONCURRENCY[-1], max_tokens,
                                                              count_tokens=False)))
        progress(f"reference: generate alone in this process, no HTTP: {requests} requests")
        results["generate"] = generate_alone(served, jobs, max_tokens, EnergyMeter())
    base = results["baseline"]
    for figures in [*results["concurrency"].values(), results["generate"]]:
        figures["tokens_per_s_vs_baseline"] = figures["output_tokens_per_s"] / base["output_tokens_per_s"]
        if figures["joules_per_token"] and base["joules_per_token"]:
            figures["joules_per_token_vs_baseline"] = figures["joules_per_token"] / base["joules_per_token"]
    return results


def format_bench_serve(results: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{1e3 * value:.0f}"

    lines = [f"{results['model']}: {results['requests']} requests of {results['max_tokens']} tokens, "
             f"{results['slots']} slots, policies {', '.join(results['policies'])} in turn",
             f"{'run':<16}{'req/s':>7}{'tok/s':>8}{'x base':>8}{'TTFT p50/p99 ms':>17}{'ITL p50/p99 ms':>16}"
             f"{'J/token':>10}{'x base':>8}  method"]
    rows = [(f"concurrency {c}", f) for c, f in results["concurrency"].items()] + [
        (f"baseline c{CONCURRENCY[-1]}", results["baseline"]), ("generate alone", results["generate"])]
    for name, f in rows:
        jpt = f["joules_per_token"]
        lines.append(f"{name:<16}{f['requests_per_s']:>7.2f}{f['output_tokens_per_s']:>8.1f}"
                     f"{f.get('tokens_per_s_vs_baseline', 1.0):>7.2f}x"
                     f"{ms(f['ttft_p50_s']) + '/' + ms(f['ttft_p99_s']):>17}"
                     f"{ms(f['itl_p50_s']) + '/' + ms(f['itl_p99_s']):>16}"
                     f"{'-' if jpt is None else f'{jpt:.4f}':>10}{f.get('joules_per_token_vs_baseline', 1.0):>7.2f}x"
                     f"  {f['energy_method']}")
    return "\n".join(lines)
