"""`greencode bench rl --collect CHECKPOINT --data DIR`: rollout collection against `generate`.

The recorder rl.collect uses (the recording mode of generation, arrays copied to the host)
against `model.generate` with `Full()` and no stop tokens, 15 new tokens, on the same model,
prompts and batch; timed in interleaved rounds, medians with quartiles.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from greencode_jax.bench.report import verdict
from greencode_jax.convert import load_pretrained
from greencode_jax.data.prepared import PreparedData
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.policies import Full
from greencode_jax.rl.collect import _doc, _Recorder, plan_episodes

TARGET_COLLECT_RATIO = 1.2  # collection's time per token within 1.2x generate Full()'s


def _quartiles(values) -> list[float]:
    if len(values) < 2:
        return [values[0]] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


def run_bench_collect(checkpoint, data_dir, *, batch_size: int = 16, rounds: int = 7, seed: int = 0,
                      split: str = "train", new_tokens: int = 15) -> dict:
    """Tokens/s of collecting rollouts and of generate Full() on `batch_size` prompts of `split`, as
    collect-rollouts plans them, in `rounds` interleaved rounds; and whether both decode the same tokens."""
    if batch_size < 1 or rounds < 1:
        raise GreencodeError(f"--batch-size {batch_size} / --rounds {rounds}: expected positive numbers")
    tokens = PreparedData(data_dir).tokens(split)
    if len(tokens) == 0:
        raise GreencodeError(f"{data_dir}: split '{split}' is empty")
    model = load_pretrained(checkpoint, scan_layers=False)
    config = model.config
    prompts = _prompts(tokens, config, batch_size, seed, new_tokens)
    ids, mask = _left_padded(prompts)
    recorder = _Recorder(model, new_tokens, "float32")

    def record():
        return recorder(prompts, batch_size)["tokens"]

    def generate():
        return np.asarray(model.generate(ids, mask, max_new_tokens=new_tokens, policy=Full(), stop_tokens=()).tokens)

    fns = {"collect": record, "generate": generate}
    first, outputs = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outputs[name] = fn()
        first[name] = time.perf_counter() - t0
    times = _alternating_rounds(fns, rounds)
    per_step = batch_size * new_tokens
    quart = {name: _quartiles([per_step / t for t in ts]) for name, ts in times.items()}
    return {"checkpoint": str(checkpoint), "data": str(data_dir), "split": split, "batch": batch_size,
            "new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts], "rounds": rounds,
            "model": {"family": config.family, "num_layers": config.num_layers, "hidden_size": config.hidden_size,
                      "exit_layers": list(config.exit_layers)},
            "device": jax.devices()[0].device_kind, "devices": jax.local_device_count(),
            "first_call_s": first, "seconds": times, "tokens_per_s_quartiles": quart,
            "ratio": quart["generate"][1] / quart["collect"][1],
            "same_tokens": bool(np.array_equal(outputs["collect"], outputs["generate"])),
            "target_ratio": TARGET_COLLECT_RATIO}


def _prompts(tokens, config, batch_size: int, seed: int, new_tokens: int) -> list:
    """A batch of prompts as collect-rollouts plans its episodes (context capped to leave room for the tokens)."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    max_context = config.max_position_embeddings - new_tokens  # as collect-rollouts caps it
    plan = plan_episodes(tokens, eos, batch_size, seed, new_tokens, max_context)
    return [_doc(tokens, int(d))[:int(c)] for d, c in plan]


def _left_padded(prompts: list) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of the prompts, left padded, as the recorder pads."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, True
    return ids, mask


def _alternating_rounds(fns: dict, rounds: int) -> dict:
    """Seconds per call of each function, after two warm-up rounds, in rounds that alternate the
    order so background load hits both alike. Each returns host arrays: its work has finished."""
    for _ in range(2):  # warm-up
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def format_bench_collect(r: dict) -> str:
    """The header, both sides' tokens/s quartiles and first call, their ratio beside the target."""
    m = r["model"]
    lines = [f"bench rl --collect: {r['checkpoint']} ({m['family']}, {m['num_layers']} layers, hidden "
             f"{m['hidden_size']}, exits {m['exit_layers']}), batch {r['batch']} prompts of '{r['split']}' "
             f"({min(r['prompt_lengths'])}-{max(r['prompt_lengths'])} tokens) x {r['new_tokens']} new tokens, "
             f"{r['rounds']} interleaved rounds, {r['device']} x {r['devices']}",
             f"  {'':36s}{'tokens/s: q1':>14s} {'median':>9s} {'q3':>9s}   first call s"]
    names = {"collect": "collection (recorder, arrays on host)", "generate": "generate Full(), no stop tokens"}
    for name, label in names.items():
        q = r["tokens_per_s_quartiles"][name]
        lines.append(f"  {label:36s}{q[0]:14,.0f} {q[1]:9,.0f} {q[2]:9,.0f}   {r['first_call_s'][name]:.1f}")
    q = r["tokens_per_s_quartiles"]
    lines.append(f"  ratio generate / collection: {q['generate'][1]:,.0f} / {q['collect'][1]:,.0f} tokens/s = "
                 f"{r['ratio']:.2f} (target <= {r['target_ratio']}: {verdict(r['ratio'] <= r['target_ratio'])}); "
                 f"greedy tokens identical: {'yes' if r['same_tokens'] else 'NO'}")
    return "\n".join(lines)
