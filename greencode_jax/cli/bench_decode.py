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
import gc
import statistics
import tempfile
import time

from greencode_jax.errors import GreencodeError

# issue 4's bounds
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
LEARNED_FUSED = "Learned, fused kernel"
NO_HEAD = "Same exit, no head"  # the middle FixedExit row on the model without its exit heads  # the same policy with kernel="pallas" (generate.policy_kernel)


class ReadBandwidth:
    """This machine's read bandwidth now: bytes/s of a jitted sum over an `nbytes` float32
    buffer on JAX's default device, the best of `repeats` sums. The buffer stays allocated
    until `close`, so each round of the benchmark can take its own reading."""

    def __init__(self, nbytes: int = 1 << 30, repeats: int = 3):
        import jax
        import jax.numpy as jnp

        self.nbytes, self.repeats = nbytes, repeats
        self.buffer = jnp.ones(nbytes // 4, jnp.float32)
        self.total = jax.jit(jnp.sum)
        self.total(self.buffer).block_until_ready()

    def __call__(self) -> float:
        return self.nbytes / min(_seconds(lambda: self.total(self.buffer).block_until_ready())
                                 for _ in range(self.repeats))

    def close(self):
        del self.buffer


def weight_bytes(model, exit_layer: int | None = None) -> int:
    """Bytes of weights one decoded token reads when it exits after `exit_layer` (None: full depth).

    Layers up to the exit: all their weights. Later layers: their input norm and K/V
    projections (state propagation). Then the exit head once (final norm, project_out,
    LM head). One embedding row (and position row) is negligible and left out.
    """
    from greencode_jax.models.model import param_arrays

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


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
                one, full = _seconds(lambda: run(1)), _seconds(lambda: run(new_tokens))
            per_token[name].append((full - one) / (new_tokens - 1))
            whole[name].append((one, full))
    return per_token, whole, readings


@contextlib.contextmanager
def _no_garbage_collection():
    """Collects first, then keeps Python's collector out of the timed calls (as timeit does):
    a collection inside one of a pair's two calls would be charged to the tokens."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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


def run_bench_decode(args) -> dict:
    import jax
    import numpy as np
    import torch

    import greencode_jax as gc
    from greencode_jax.bench.zoo import bench_models, bench_source, synchronize, torch_device

    if args.prompt <= 0 or args.new < 2 or args.repeats <= 0:
        raise GreencodeError("--prompt and --repeats must be positive and --new at least 2")
    shape, model_path = bench_source(args.shape, args.model)
    device = torch_device(args.torch_device)
    with bench_models(shape, model_path, args.dtype, exit_layers=args.exit_layers, scan_layers=False) as loaded:
        model, reference, label = loaded.model, loaded.reference.to(device), loaded.label
    config = model.config
    if args.prompt + args.new > config.max_position_embeddings:
        raise GreencodeError(f"--prompt {args.prompt} + --new {args.new} exceeds the model's "
                             f"{config.max_position_embeddings} positions")
    params = sum(x.size for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
    platform = jax.devices()[0].platform
    print(f"bench decode: {label} ({params / 1e6:.1f}M parameters), batch 1, {args.prompt}-token prompt, "
          f"{args.new} new tokens, {args.dtype}, exits {list(config.exit_layers)}, {args.repeats} interleaved rounds; "
          f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {device}"
          f"{'' if device == 'cuda' else f' with {torch.get_num_threads()} threads'}", flush=True)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, args.prompt))
    read_bandwidth = ReadBandwidth()

    last = config.num_layers - 1
    targets = sorted({min(config.exit_layers, key=lambda e: abs(e - q * config.num_layers)) for q in (0.25, 0.5, 0.75)})
    policies = {"Full()": (gc.policies.Full(), None)}
    policies.update({f"FixedExit({k})": (gc.policies.FixedExit(k), k) for k in targets if k != last})
    # Full() has no conditional; a policy that may exit has one after each of its decisions, whose
    # cost (on a GPU a launch or a graph node each) FixedExit(last) shows without any policy work.
    policies[SKIP_PATH] = (gc.policies.FixedExit(last), None)
    learned_params = gc.policies.Learned.init_params(jax.random.key(0), config.hidden_size)
    kernels = args.learned_kernels or (("xla", "pallas") if platform == "gpu" else ("xla",))
    learned_rows = {LEARNED: "xla", LEARNED_FUSED: "pallas"}
    for name, kernel in learned_rows.items():  # threshold 2: never exits: full depth plus the policy
        if kernel in kernels:
            policies[name] = (gc.policies.Learned(learned_params, threshold=2.0, kernel=kernel), None)

    def ours(policy, on=model):
        return lambda n: jax.block_until_ready(
            on.generate(ids, max_new_tokens=n, policy=policy, stop_tokens=()).tokens)

    torch_ids = torch.tensor(ids, device=device)

    def transformers_generate(n):
        with torch.inference_mode():
            tokens = reference.generate(torch_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)
        synchronize(device)
        return tokens

    runners = {name: ours(policy) for name, (policy, _) in policies.items()}
    headless = None
    if model.exit_heads is not None and len(targets) > 1:  # what a head adds to a token that exits through it
        from flax import nnx

        headless = nnx.clone(model)
        headless.exit_heads = nnx.data(None)
        headless.config = config.replace(exit_head="", exit_head_rank=0)
        middle = targets[len(targets) // 2]
        runners[NO_HEAD] = ours(gc.policies.FixedExit(middle), headless)
        policies[NO_HEAD] = (gc.policies.FixedExit(middle), middle)
    runners["transformers"] = transformers_generate
    for name, run in list(runners.items()):  # compile / warm up both lengths
        try:
            run(1), run(args.new)
        except Exception as e:  # the fused kernel is new on each card: a failure drops its row, not the run
            if name != LEARNED_FUSED:
                raise
            print(f"  {name}: dropped, it failed on this device: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del runners[name], policies[name]
    try:
        samples, whole, bandwidths = interleaved_per_token(runners, args.new, args.repeats, each_round=read_bandwidth)
    finally:
        read_bandwidth.close()

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
    for name in learned_rows.keys() & rows.keys():
        ratios = paired_ratios(samples, name, SKIP_PATH)
        rows[name]["ratio_to_skip_path"] = statistics.median(ratios)
        rows[name]["ratio_to_skip_path_quartiles"] = quartiles(ratios)
    full_bytes = rows["Full()"]["bytes"]
    to_floor = floor_ratios(samples["Full()"], bandwidths, full_bytes)
    bandwidth = statistics.median(bandwidths)
    hf_bound = HF_BOUND_GPU if platform == "gpu" else HF_BOUND_SMALL if params < SMALL_MODEL_PARAMS else HF_BOUND
    results = {"shape": shape, "model": model_path, "params": params, "dtype": args.dtype, "exit_layers": list(config.exit_layers),
               "prompt": args.prompt, "new_tokens": args.new,
               "repeats": args.repeats, "read_bandwidth_gbs": bandwidth / 1e9,
               "read_bandwidth_rounds_gbs": [b / 1e9 for b in bandwidths], "memory_floor_ms": full_bytes / bandwidth * 1e3,
               "floor_ratio": statistics.median(to_floor), "floor_ratio_quartiles": quartiles(to_floor),
               "rows": rows, "hf_seconds_per_token": statistics.median(samples["transformers"]),
               "hf_seconds_per_token_rounds": samples["transformers"],
               "hf_speedup": 1 / paired_ratio(samples, "Full()", "transformers"),
               "hf_total_s": statistics.median(t for _, t in whole["transformers"]),
               "ours_total_s": rows["Full()"]["call_seconds"][1],
               "device": jax.devices()[0].device_kind, "torch_device": device,
               "erratic_rounds": erratic_rounds(samples)}
    _print(results, hf_bound)
    _write_json(args.json, results)  # the timings are kept even if tracing fails
    if args.profile:
        traced = ("Full()", SKIP_PATH, *learned_rows)
        results["profile"], results["device_per_token"], results["command_buffers"] = profile_policies(
            {name: run for name, run in runners.items() if name in traced}, args.new, args.profile)
        _write_json(args.json, results)
    return results


def _write_json(path: str | None, results: dict):
    if path:
        from greencode_jax.atomic import write_json_output

        write_json_output(path, results, "benchmark")


def erratic_rounds(samples: dict) -> int:
    """Rounds in which some runner's `new_tokens` run took no longer than its 1-token run:
    a per-token time <= 0 says the machine's timing swung by more than the tokens cost."""
    return sum(any(per_token[i] <= 0 for per_token in samples.values()) for i in range(len(next(iter(samples.values())))))


def device_per_token(summary_new: dict, summary_one: dict, new_tokens: int) -> dict:
    """Per token, between trace summaries of a `new_tokens` and a 1-token generate, over their
    stream lines (XLA's op and module lines repeat the kernels): µs of kernels and copies
    ("busy_us") and device-to-host copies ("host_reads": a loop or conditional run from the host
    reads its predicate so)."""
    def total(summary, field):
        return sum(field(line) for name, line in summary.items() if "Stream" in name)

    def per_token(field):
        return (total(summary_new, field) - total(summary_one, field)) / (new_tokens - 1)

    return {"busy_us": per_token(lambda line: line["busy_us"]),
            "host_reads": per_token(lambda line: line["copies"].get("MemcpyD2H", 0))}


def profile_policies(runners: dict, new_tokens: int, out_dir: str) -> tuple[dict, dict, dict]:
    """Traces one `new_tokens` generate per runner into out_dir/<name>.perfetto.json.gz and
    prints, per device line, its kernels and busy time per token (the prompt pass included).
    A 1-token generate is traced too, so that the device's busy time per token excludes the
    prompt: (busy(new_tokens) - busy(1)) / (new_tokens - 1), as for the wall-clock figures.
    Kernel durations do not swing with the host's timing as wall-clock time does on a GPU,
    but they leave out the device's idle gaps (launches, predicates' trips to the host).
    Kernels inside CUDA graphs (generate's default on a GPU) are not in the trace: there the
    busy time covers only what runs outside them (CUPTI's graph tracing crashed JAX 0.11.2 on an H100).
    It also counts, per traced generate, XLA's host records of its CUDA graphs (trace_summary.
    command_buffer_events): an `update` in every call means the host records a graph again per
    call, because a buffer it uses has a new address each time.
    Returns the summaries, those per-token figures (empty where the trace has no device lines)
    and the command-buffer counts."""
    import pathlib
    import re
    import shutil

    import jax

    from greencode_jax.cli.trace_summary import command_buffer_events, summarize_trace

    def traced(run, n, target=None):
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                run(n)
            (trace,) = pathlib.Path(tmp).rglob("perfetto_trace.json.gz")
            if target is None:
                return summarize_trace(trace)
            shutil.move(trace, target)
            return summarize_trace(target), command_buffer_events(target)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, per_token, graphs = {}, {}, {}
    for name, run in runners.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        target = out / f"{slug}.perfetto.json.gz"
        summary, graphs[name] = traced(run, new_tokens, target)
        summaries[name] = summary
        if summary:
            per_token[name] = device_per_token(summary, traced(run, 1), new_tokens)
        print(f"  profile {name}: {target}; CUDA graphs: " + ", ".join(f"{count} {kind.replace('_', ' ')}"
                                                                        for kind, count in graphs[name].items()))
        for line, s in summary.items():
            print(f"    {line}: {s['events'] / new_tokens:.1f} events/token, busy {s['busy_us'] / new_tokens:.1f} us/token "
                  f"of a {s['span_us'] / new_tokens:.1f} us/token span; most time: "
                  + ", ".join(f"{t['name'][:40]} x{t['count']} {t['total_us']:.0f} us" for t in s["top"][:3]))
        if not summary:
            print("    no device lines in the trace (on a CPU, XLA's work shows as host threads only)")
    _print_device_per_token(per_token)
    return summaries, per_token, graphs


def _print_device_per_token(rows: dict):
    if "Full()" not in rows:
        return
    print("  device busy time per token (kernels and copies of the traced runs, idle gaps left out; kernels "
          "inside CUDA graphs are not traced: XLA_FLAGS=--xla_gpu_enable_command_buffer= turns graphs off), and "
          "device-to-host reads per token:")
    for name, row in rows.items():
        base = SKIP_PATH if name in (LEARNED, LEARNED_FUSED) and SKIP_PATH in rows else "Full()"
        ratio = "" if name == "Full()" else f" = {row['busy_us'] / rows[base]['busy_us']:.3f}x {base}"
        print(f"    {name:23s} {row['busy_us']:8.1f} us{ratio}; {row['host_reads']:.1f} reads")


def bounded_verdict(value: float, spread: tuple[float, float], bound: float) -> str:
    """'meets' or 'MISSES' by the median `value`, marked when the rounds' quartiles straddle the bound."""
    if spread[0] <= 0:
        return "no verdict: some rounds timed no cost per token"
    verdict = "meets" if value <= bound else "MISSES"
    return verdict + (", within noise: its rounds' quartiles straddle the bound" if spread[0] <= bound <= spread[1] else "")


def _checked(ratio: float, name: str, ms: float, base_ms: float) -> str:
    """A same-round ratio with the medians beside it: '0.964x Full() [1.37/0.87 ms = 1.575x]'. The two
    differ when rounds disagree; the bracket lets a reader redo the division by hand."""
    return f"{ratio:.3f}x {name} [{_ms(ms)}/{_ms(base_ms)} ms = {ms / base_ms:.3f}x]"


def _ms(value: float) -> str:
    """Milliseconds with enough digits to redo a division by hand: 1.37, 0.0283."""
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"


def _print(r: dict, hf_bound: float):
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    if r["erratic_rounds"]:
        print(f"  warning: {r['erratic_rounds']} of {r['repeats']} rounds timed a {r['new_tokens']}-token generate no "
              f"slower than a 1-token one; this machine's timing swings more than the tokens cost (raise --new or "
              f"--repeats, or read the device busy times of --profile); whole calls, 1 / {r['new_tokens']} tokens "
              f"(medians): " + ", ".join(f"{name} {row['call_seconds'][0] * 1e3:.1f} / {row['call_seconds'][1] * 1e3:.1f} ms"
                                         for name, row in r["rows"].items()))
    full = r["rows"]["Full()"]
    full_ms = full["seconds_per_token"] * 1e3
    rounds = r["read_bandwidth_rounds_gbs"]
    print(f"  read bandwidth {r['read_bandwidth_gbs']:.1f} GB/s (median of the rounds' readings, {min(rounds):.1f}-"
          f"{max(rounds):.1f}); Full() reads {full['bytes'] / 1e6:.1f} MB/token -> memory floor "
          f"{_ms(r['memory_floor_ms'])} ms/token")
    print(f"  columns: ms/token is each row's median over the {r['repeats']} rounds; a ratio 'R x X' is the median "
          "over rounds of the row's time / X's time in the same round, so it need not equal the ratio of the medians, "
          "which follows it in brackets [row ms / X ms = ratio of medians]")
    ratio_floor, spread = r["floor_ratio"], r["floor_ratio_quartiles"]
    floor_bound = (f"bound <= {FLOOR_BOUND}: {bounded_verdict(ratio_floor, spread, FLOOR_BOUND)}"
                   if r["params"] >= SMALL_MODEL_PARAMS
                   else "no floor bound: a model this small is bound by overhead, not memory")
    floor_ratio = _checked(ratio_floor, "floor", full_ms, r["memory_floor_ms"])
    print(f"  {'Full()':23s} {full_ms:8.2f} ms/token = {floor_ratio}, "
          f"each round against its own bandwidth reading (rounds' quartiles {spread[0]:.2f}-{spread[1]:.2f}; "
          f"{floor_bound})")
    speedup = r["hf_speedup"]
    hf_ms = r["hf_seconds_per_token"] * 1e3
    print(f"  {'transformers':23s} {hf_ms:8.2f} ms/token -> ours {speedup:.2f}x its tokens/s "
          f"[{_ms(hf_ms)}/{_ms(full_ms)} ms = {hf_ms / full_ms:.2f}x] "
          f"(bound >= {hf_bound}: {verdict(speedup >= hf_bound)}); "
          f"whole generate incl. prompt: ours {r['ours_total_s']:.3f} s, transformers {r['hf_total_s']:.3f} s")
    skip_ms = r["rows"][SKIP_PATH]["seconds_per_token"] * 1e3 if SKIP_PATH in r["rows"] else None
    for name, row in r["rows"].items():
        if name == "Full()":
            continue
        time_ratio = row["ratio_to_full"]
        bytes_ratio = row["bytes"] / full["bytes"]
        row_ms = row["seconds_per_token"] * 1e3
        ms = f"{name:23s} {row_ms:8.2f} ms/token = {_checked(time_ratio, 'Full()', row_ms, full_ms)}"
        if name == SKIP_PATH:
            print(f"  {ms}: FixedExit(last), a lax.cond after each of {len(r['exit_layers']) - 1} exit decisions")
        elif name == NO_HEAD:
            print(f"  {ms}: the same exit on the model with its exit heads removed")
        elif "ratio_to_skip_path" in row:  # a Learned row
            policy_cost, spread = row["ratio_to_skip_path"], row["ratio_to_skip_path_quartiles"]
            print(f"  {ms}, {_checked(policy_cost, 'the skip path', row_ms, skip_ms)} (rounds' quartiles "
                  f"{spread[0]:.3f}-{spread[1]:.3f}; the policy's own cost, bound <= {LEARNED_BOUND}: "
                  f"{bounded_verdict(policy_cost, spread, LEARNED_BOUND)})")
        else:
            within, spread = time_ratio / bytes_ratio, [q / bytes_ratio for q in row["ratio_to_full_quartiles"]]
            print(f"  {ms}, bytes {bytes_ratio:.3f}x -> {within:.2f}x the byte ratio (rounds' quartiles "
                  f"{spread[0]:.2f}-{spread[1]:.2f}; bound <= {EXIT_RATIO_BOUND}: "
                  f"{bounded_verdict(within, spread, EXIT_RATIO_BOUND)})")
            if "ratio_to_no_head" in row:
                head, spread = row["ratio_to_no_head"], row["ratio_to_no_head_quartiles"]
                print(f"  {'':23s} through its exit head: {head:.3f}x the same exit without heads (rounds' quartiles "
                      f"{spread[0]:.3f}-{spread[1]:.3f}; bound <= {HEAD_BOUND}: "
                      f"{bounded_verdict(head, spread, HEAD_BOUND)})")
