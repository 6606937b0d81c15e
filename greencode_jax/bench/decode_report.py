"""The lines `greencode bench decode` prints: each row's time per token beside the ratio it is
judged by, with the medians that ratio can be checked against, and a verdict that says when the
rounds' spread straddles the bound."""

from __future__ import annotations

from greencode_jax.bench.decode import (EXIT_RATIO_BOUND, FLOOR_BOUND, HEAD_BOUND, LEARNED_BOUND, NO_HEAD, SKIP_PATH,
                                        SMALL_MODEL_PARAMS)
from greencode_jax.bench.report import verdict


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


def format_bench_decode(r: dict, hf_bound: float) -> str:
    """The figures of `run_bench_decode` (its `results` and `hf_bound`), a line per row."""
    lines = _summary_lines(r, hf_bound)
    for name, row in r["rows"].items():
        if name != "Full()":
            lines += _row_lines(name, row, r)
    return "\n".join(lines)


def _summary_lines(r: dict, hf_bound: float) -> list[str]:
    """The erratic-rounds warning, the bandwidth and memory floor, the columns' meaning, Full() against
    its floor and transformers' generate against Full()."""
    lines = []
    if r["erratic_rounds"]:
        lines.append(
            f"  warning: {r['erratic_rounds']} of {r['repeats']} rounds timed a {r['new_tokens']}-token generate no "
            f"slower than a 1-token one; this machine's timing swings more than the tokens cost (raise --new or "
            f"--repeats, or read the device busy times of --profile); whole calls, 1 / {r['new_tokens']} tokens "
            f"(medians): " + ", ".join(f"{name} {row['call_seconds'][0] * 1e3:.1f} / {row['call_seconds'][1] * 1e3:.1f} ms"
                                       for name, row in r["rows"].items()))
    full = r["rows"]["Full()"]
    full_ms = full["seconds_per_token"] * 1e3
    rounds = r["read_bandwidth_rounds_gbs"]
    lines.append(f"  read bandwidth {r['read_bandwidth_gbs']:.1f} GB/s (median of the rounds' readings, {min(rounds):.1f}-"
                 f"{max(rounds):.1f}); Full() reads {full['bytes'] / 1e6:.1f} MB/token -> memory floor "
                 f"{_ms(r['memory_floor_ms'])} ms/token")
    lines.append(f"  columns: ms/token is each row's median over the {r['repeats']} rounds; a ratio 'R x X' is the "
                 "median over rounds of the row's time / X's time in the same round, so it need not equal the ratio of "
                 "the medians, which follows it in brackets [row ms / X ms = ratio of medians]")
    ratio_floor, spread = r["floor_ratio"], r["floor_ratio_quartiles"]
    floor_bound = (f"bound <= {FLOOR_BOUND}: {bounded_verdict(ratio_floor, spread, FLOOR_BOUND)}"
                   if r["params"] >= SMALL_MODEL_PARAMS
                   else "no floor bound: a model this small is bound by overhead, not memory")
    floor_ratio = _checked(ratio_floor, "floor", full_ms, r["memory_floor_ms"])
    lines.append(f"  {'Full()':23s} {full_ms:8.2f} ms/token = {floor_ratio}, each round against its own bandwidth "
                 f"reading (rounds' quartiles {spread[0]:.2f}-{spread[1]:.2f}; {floor_bound})")
    speedup = r["hf_speedup"]
    hf_ms = r["hf_seconds_per_token"] * 1e3
    lines.append(f"  {'transformers':23s} {hf_ms:8.2f} ms/token -> ours {speedup:.2f}x its tokens/s "
                 f"[{_ms(hf_ms)}/{_ms(full_ms)} ms = {hf_ms / full_ms:.2f}x] "
                 f"(bound >= {hf_bound}: {verdict(speedup >= hf_bound)}); "
                 f"whole generate incl. prompt: ours {r['ours_total_s']:.3f} s, transformers {r['hf_total_s']:.3f} s")
    return lines


def _row_lines(name: str, row: dict, r: dict) -> list[str]:
    """A policy's row against Full(): the skip path and the headless exit as they are, Learned against
    the skip path, a fixed exit against its ratio of bytes read (and its head's cost, when measured)."""
    full = r["rows"]["Full()"]
    full_ms = full["seconds_per_token"] * 1e3
    time_ratio = row["ratio_to_full"]
    bytes_ratio = row["bytes"] / full["bytes"]
    row_ms = row["seconds_per_token"] * 1e3
    ms = f"{name:23s} {row_ms:8.2f} ms/token = {_checked(time_ratio, 'Full()', row_ms, full_ms)}"
    if name == SKIP_PATH:
        return [f"  {ms}: FixedExit(last), a lax.cond after each of {len(r['exit_layers']) - 1} exit decisions"]
    if name == NO_HEAD:
        return [f"  {ms}: the same exit on the model with its exit heads removed"]
    if "ratio_to_skip_path" in row:  # a Learned row
        skip_ms = r["rows"][SKIP_PATH]["seconds_per_token"] * 1e3
        policy_cost, spread = row["ratio_to_skip_path"], row["ratio_to_skip_path_quartiles"]
        return [f"  {ms}, {_checked(policy_cost, 'the skip path', row_ms, skip_ms)} (rounds' quartiles "
                f"{spread[0]:.3f}-{spread[1]:.3f}; the policy's own cost, bound <= {LEARNED_BOUND}: "
                f"{bounded_verdict(policy_cost, spread, LEARNED_BOUND)})"]
    within, spread = time_ratio / bytes_ratio, [q / bytes_ratio for q in row["ratio_to_full_quartiles"]]
    lines = [f"  {ms}, bytes {bytes_ratio:.3f}x -> {within:.2f}x the byte ratio (rounds' quartiles "
             f"{spread[0]:.2f}-{spread[1]:.2f}; bound <= {EXIT_RATIO_BOUND}: "
             f"{bounded_verdict(within, spread, EXIT_RATIO_BOUND)})"]
    if "ratio_to_no_head" in row:
        head, spread = row["ratio_to_no_head"], row["ratio_to_no_head_quartiles"]
        lines.append(f"  {'':23s} through its exit head: {head:.3f}x the same exit without heads (rounds' quartiles "
                     f"{spread[0]:.3f}-{spread[1]:.3f}; bound <= {HEAD_BOUND}: "
                     f"{bounded_verdict(head, spread, HEAD_BOUND)})")
    return lines
