"""`greencode bench decode`: early-exit decoding against transformers' `generate` and the memory floor.

Decoding one token at batch 1 reads every weight it uses once, so its floor is the
bytes of weights read divided by this machine's read bandwidth (a jitted reduction over a
buffer larger than the caches). Per-token time is
(t(prefill + N tokens) - t(prefill + 1 token)) / (N - 1), so the prompt pass is excluded.
Every figure, the bandwidth included, is measured in interleaved rounds and ratios are
medians of same-round ratios: on a shared machine a slow spell (or a fast one: this
project's 2-core VM reads at 28 to 50 GB/s from one minute to the next) otherwise lands on
one figure and not on another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc as garbage_collector
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from greencode_jax.bench.report import Progress, printer
from greencode_jax.bench.zoo import (bench_models, bench_source, runtime_label, seconds, synchronize,
                                     torch_device as choose_torch_device)
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.policies import FixedExit, Full, Learned
from greencode_jax.models.model import param_arrays

# the decode bounds
FLOOR_BOUND = 1.25  # Full(): time per token <= 1.25x the memory floor
HF_BOUND = 1.0  # Full(): tokens/s >= 1.0x transformers' generate
HF_BOUND_SMALL = 3.0  # ... >= 3x for a ~10M-parameter model, whose cost is overhead
HF_BOUND_GPU = 2.0  # on a GPU (bf16, ~1B Llama): >= 2x transformers' generate
SMALL_MODEL_PARAMS = 20e6
EXIT_RATIO_BOUND = 1.15  # t(FixedExit(k)) / t(Full()) within 1.15x of the ratio of bytes read
LEARNED_BOUND = 1.03  # Learned adds <= 3 % to a full-depth token (against the same skip path)
HEAD_BOUND = 1.02  # an exit head adds <= 2 % to a token that exits through it
SKIP_PATH = "Skip path (never exits)"
LEARNED = "Learned (never exits)"
LEARNED_FUSED = "Learned, fused kernel"  # the same policy with kernel="pallas" (generate.policy_kernel)
NO_HEAD = "Same exit, no head"  # the middle FixedExit row on the model without its exit heads
LEARNED_ROWS = {LEARNED: "xla", LEARNED_FUSED: "pallas"}  # threshold 2: never exits, full depth plus the policy


class ReadBandwidth:
    """This machine's read bandwidth now: bytes/s of a jitted sum over an `nbytes` float32
    buffer on JAX's default device, the best of `repeats` sums. The buffer stays allocated
    until `close`, so each round of the benchmark can take its own reading."""

    def __init__(self, nbytes: int = 1 << 30, repeats: int = 3):
        self.nbytes, self.repeats = nbytes, repeats
        self.buffer = jnp.ones(nbytes // 4, jnp.float32)
        self.total = jax.jit(jnp.sum)
        self.total(self.buffer).block_until_ready()

    def __call__(self) -> float:
        return self.nbytes / min(seconds(lambda: self.total(self.buffer).block_until_ready())
                                 for _ in range(self.repeats))

    def close(self):
        del self.buffer


def weight_bytes(model, exit_layer: int | None = None) -> int:
    """Bytes of weights one decoded token reads when it exits after `exit_layer` (None: full depth).

    Layers up to the exit: all their weights. Later layers: their input norm and K/V
    projections (state propagation). Then the exit head once (final norm, project_out,
    LM head). One embedding row (and position row) is negligible and left out.
    """
    config = model.config
    exit_layer = config.num_layers - 1 if exit_layer is None else exit_layer
    read = []
    for i in range(config.num_layers):
        block = model.block(i)
        if i <= exit_layer:
            read.append(block)
        else:
            read += [block.attn.k_proj, block.attn.v_proj] + ([block.attn_norm] if block.pre_norm else [])
    return sum(x.nbytes for x in param_arrays(*read, *model.exit_head_modules()))


def interleaved_per_token(runners: dict, new_tokens: int, repeats: int, each_round=None) -> tuple[dict, dict, list]:
    """Per-token seconds of each runner, measured in rounds: every round times each runner
    for 1 and for `new_tokens` tokens, so the prompt pass cancels out, and runs them all in
    turn, so a slow spell of this shared machine hits every figure of that round alike.
    Each timed pair follows an untimed 1-token call of the same runner: rows of one policy kind
    (FixedExit(k) and the skip path) share a compiled program but not their numbers' buffers,
    and on a GPU the first call after another row's records the program's CUDA graph again on
    the host (XLA's update when a buffer moved). Left in, that cost would land on the 1-token
    call alone and make those rows look cheaper per token than they are for a user who keeps
    one policy.
    `each_round()`, if given, is read once at the start of every round (the read bandwidth).
    Returns each runner's per-round samples of seconds per token and of its two whole calls
    (1 token, `new_tokens` tokens), and the per-round readings."""
    per_token, whole, readings = {name: [] for name in runners}, {name: [] for name in runners}, []
    for _ in range(repeats):
        if each_round is not None:
            readings.append(each_round())
        for name, run in runners.items():
            run(1)  # untimed: this row's buffers settle into the program
            with _no_garbage_collection():
                one, full = seconds(lambda: run(1)), seconds(lambda: run(new_tokens))
            per_token[name].append((full - one) / (new_tokens - 1))
            whole[name].append((one, full))
    return per_token, whole, readings


@contextlib.contextmanager
def _no_garbage_collection():
    """Collects first, then keeps Python's collector out of the timed calls (as timeit does):
    a collection inside one of a pair's two calls would be charged to the tokens."""
    garbage_collector.collect()
    garbage_collector.disable()
    try:
        yield
    finally:
        garbage_collector.enable()


def floor_ratios(seconds_per_token: list[float], bandwidths: list[float], nbytes: int) -> list[float]:
    """Each round's time per token over that round's memory floor (`nbytes` at its bandwidth)."""
    return [t / (nbytes / b) for t, b in zip(seconds_per_token, bandwidths, strict=True)]


def paired_ratio(samples: dict, name: str, base: str) -> float:
    """Median over rounds of name's time / base's time in the same round."""
    return statistics.median(paired_ratios(samples, name, base))


def paired_ratios(samples: dict, name: str, base: str) -> list[float]:
    """name's time / base's time, round by round."""
    return [a / b for a, b in zip(samples[name], samples[base])]


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartile (the extremes below 4 values): how far one round's ratio strays."""
    if len(values) < 4:
        return min(values), max(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def erratic_rounds(samples: dict) -> int:
    """Rounds in which some runner's `new_tokens` run took no longer than its 1-token run:
    a per-token time <= 0 says the machine's timing swung by more than the tokens cost."""
    return sum(any(per_token[i] <= 0 for per_token in samples.values()) for i in range(len(next(iter(samples.values())))))


@dataclasses.dataclass
class DecodeRun:
    """What `run_bench_decode` measured: the figures (as `--json` writes them), the bound on
    tokens/s against transformers' `generate` that applies on this device and model, and each
    row's `run(new_tokens)`, which `decode_profile.profile_decode` traces."""
    results: dict
    hf_bound: float
    runners: dict


def run_bench_decode(*, shape: str | None = None, model: str | None = None, prompt: int = 256, new: int = 15,
                     dtype: str = "float32", exit_layers=None, repeats: int = 7, learned_kernels=None,
                     torch_device: str | None = None, progress: Progress | None = None) -> DecodeRun:
    """Batch-1 decoding per policy (Full(), fixed exits, the skip path, Learned that never exits, the
    same exit without heads) against the memory floor and transformers' `generate`, in `repeats`
    interleaved rounds of a `prompt`-token prompt and `new` tokens. `learned_kernels`: "xla" and/or
    "pallas" (default: both on a GPU, xla elsewhere). The header goes to `progress`."""
    say = printer(progress)
    if prompt <= 0 or new < 2 or repeats <= 0:
        raise GreencodeError("--prompt and --repeats must be positive and --new at least 2")
    shape, model_path = bench_source(shape, model)
    device = choose_torch_device(torch_device)
    with bench_models(shape, model_path, dtype, exit_layers=exit_layers, scan_layers=False) as loaded:
        lm, reference, label = loaded.model, loaded.reference.to(device), loaded.label
    config = lm.config
    if prompt + new > config.max_position_embeddings:
        raise GreencodeError(f"--prompt {prompt} + --new {new} exceeds the model's "
                             f"{config.max_position_embeddings} positions")
    params = sum(x.size for x in jax.tree.leaves(nnx.state(lm)))
    platform = jax.devices()[0].platform
    say(f"bench decode: {label} ({params / 1e6:.1f}M parameters), batch 1, {prompt}-token prompt, {new} new tokens, "
        f"{dtype}, exits {list(config.exit_layers)}, {repeats} interleaved rounds; {runtime_label(device)}")
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, prompt))
    read_bandwidth = ReadBandwidth()
    kernels = learned_kernels or (("xla", "pallas") if platform == "gpu" else ("xla",))
    policies, runners = _runners(lm, reference, device, ids, kernels)
    _warm_up(runners, policies, new, say)
    try:
        samples, whole, bandwidths = interleaved_per_token(runners, new, repeats, each_round=read_bandwidth)
    finally:
        read_bandwidth.close()
    rows = _rows(lm, policies, samples, whole)
    full_bytes = rows["Full()"]["bytes"]
    to_floor = floor_ratios(samples["Full()"], bandwidths, full_bytes)
    bandwidth = statistics.median(bandwidths)
    hf_bound = HF_BOUND_GPU if platform == "gpu" else HF_BOUND_SMALL if params < SMALL_MODEL_PARAMS else HF_BOUND
    results = {"shape": shape, "model": model_path, "params": params, "dtype": dtype,
               "exit_layers": list(config.exit_layers), "prompt": prompt, "new_tokens": new, "repeats": repeats,
               "read_bandwidth_gbs": bandwidth / 1e9, "read_bandwidth_rounds_gbs": [b / 1e9 for b in bandwidths],
               "memory_floor_ms": full_bytes / bandwidth * 1e3,
               "floor_ratio": statistics.median(to_floor), "floor_ratio_quartiles": quartiles(to_floor),
               "rows": rows, "hf_seconds_per_token": statistics.median(samples["transformers"]),
               "hf_seconds_per_token_rounds": samples["transformers"],
               "hf_speedup": 1 / paired_ratio(samples, "Full()", "transformers"),
               "hf_total_s": statistics.median(t for _, t in whole["transformers"]),
               "ours_total_s": rows["Full()"]["call_seconds"][1],
               "device": jax.devices()[0].device_kind, "torch_device": device,
               "erratic_rounds": erratic_rounds(samples)}
    return DecodeRun(results, hf_bound, runners)


def _runners(model, reference, device: str, ids, kernels) -> tuple[dict, dict]:
    """(row name -> (policy, exit layer or None), row name -> run(n)): Full(), FixedExit at the
    exits nearest 1/4, 1/2 and 3/4 of the depth, the skip path, Learned per kernel, the middle
    exit without exit heads (when the model has them), and transformers' generate."""
    config = model.config
    last = config.num_layers - 1
    targets = sorted({min(config.exit_layers, key=lambda e: abs(e - q * config.num_layers)) for q in (0.25, 0.5, 0.75)})
    policies = {"Full()": (Full(), None)}
    policies.update({f"FixedExit({k})": (FixedExit(k), k) for k in targets if k != last})
    # Full() has no conditional; a policy that may exit has one after each of its decisions, whose
    # cost (on a GPU a launch or a graph node each) FixedExit(last) shows without any policy work.
    policies[SKIP_PATH] = (FixedExit(last), None)
    learned_params = Learned.init_params(jax.random.key(0), config.hidden_size)
    for name, kernel in LEARNED_ROWS.items():
        if kernel in kernels:
            policies[name] = (Learned(learned_params, threshold=2.0, kernel=kernel), None)

    def ours(policy, on=model):
        return lambda n: jax.block_until_ready(
            on.generate(ids, max_new_tokens=n, policy=policy, stop_tokens=()).tokens)

    runners = {name: ours(policy) for name, (policy, _) in policies.items()}
    if model.exit_heads is not None and len(targets) > 1:  # what a head adds to a token that exits through it
        headless = nnx.clone(model)
        headless.exit_heads = nnx.data(None)
        headless.config = config.replace(exit_head="", exit_head_rank=0)
        middle = targets[len(targets) // 2]
        runners[NO_HEAD] = ours(FixedExit(middle), headless)
        policies[NO_HEAD] = (FixedExit(middle), middle)
    runners["transformers"] = _transformers_generate(reference, device, ids)
    return policies, runners


def _transformers_generate(reference, device: str, ids):
    import torch

    torch_ids = torch.tensor(ids, device=device)

    def run(n):
        with torch.inference_mode():
            tokens = reference.generate(torch_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)
        synchronize(device)
        return tokens

    return run


def _warm_up(runners: dict, policies: dict, new_tokens: int, say: Progress):
    """Compiles and warms up both lengths of every row; a failing fused kernel drops its row, not the run."""
    for name, run in list(runners.items()):
        try:
            run(1), run(new_tokens)
        except Exception as e:  # the fused kernel is new on each card
            if name != LEARNED_FUSED:
                raise
            say(f"  {name}: dropped, it failed on this device: {type(e).__name__}: {str(e)[:300]}")
            del runners[name], policies[name]


def _rows(model, policies: dict, samples: dict, whole: dict) -> dict:
    """Each policy's figures: time per token, its same-round ratios to Full() (to the skip path for
    Learned, to the headless exit for the FixedExit that has one) and the bytes a token reads."""
    rows = {}
    for name, (_, layer) in policies.items():
        to_full = paired_ratios(samples, name, "Full()")
        rows[name] = dict(seconds_per_token=statistics.median(samples[name]), seconds_per_token_rounds=samples[name],
                          ratio_to_full=statistics.median(to_full),
                          ratio_to_full_quartiles=quartiles(to_full), bytes=weight_bytes(model, layer),
                          call_seconds=[statistics.median(calls) for calls in zip(*whole[name])])
    if NO_HEAD in rows:
        with_head = f"FixedExit({policies[NO_HEAD][1]})"
        ratios = paired_ratios(samples, with_head, NO_HEAD)
        rows[with_head]["ratio_to_no_head"] = statistics.median(ratios)
        rows[with_head]["ratio_to_no_head_quartiles"] = quartiles(ratios)
    for name in LEARNED_ROWS.keys() & rows.keys():
        ratios = paired_ratios(samples, name, SKIP_PATH)
        rows[name]["ratio_to_skip_path"] = statistics.median(ratios)
        rows[name]["ratio_to_skip_path_quartiles"] = quartiles(ratios)
    return rows
