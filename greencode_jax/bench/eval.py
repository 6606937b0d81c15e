"""`greencode bench eval`: the evaluation loop's overhead per sample against bare `generate`.

Both sides run the same prompts at batch 1 with the same policy and compiled program (warmed
up first, untimed): *bare* calls `generate` and blocks on its outputs; *loop* is the
evaluation's runner (energy window, decoding, every metric, the record appended and
flushed) writing into a fresh directory each round. Rounds alternate the two so drift
spreads over both; medians are reported, with the ratio loop / bare (target <= 1.2).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import jax

from greencode_jax.energy import EnergyMeter
from greencode_jax.errors import GreencodeError
from greencode_jax.config import EvalConfig
from greencode_jax.eval.records import RecordFile
from greencode_jax.eval.run import _Runner, plan_evaluation
from greencode_jax.generate import generate

TARGET_RATIO = 1.2  # the evaluation loop's time per record <= 1.2x bare generate's


def run_bench_eval(checkpoint, data_dir, *, samples: int = 20, policy: str = "full", policy_dir=None,
                   repeats: int = 3, config: EvalConfig | None = None, energy_config=None) -> dict:
    """Seconds per record of the evaluation loop and of bare generate over the same `samples`
    completion samples at batch 1, in `repeats` alternating rounds (medians)."""
    if samples < 1 or repeats < 1:
        raise GreencodeError("--samples and --repeats must be positive")
    cfg = dataclasses.replace(config or EvalConfig(), samples=samples, policies=policy, protocols=("completion",),
                              batch_size=(1,))
    plan = plan_evaluation(checkpoint, data_dir, policy_dir=policy_dir, config=cfg, energy_config=energy_config)
    protocol = plan.protocols[0]

    def bare():  # every planned policy: Full() too when another is asked (the loop's agreement needs it)
        for choice in plan.choices:
            model = plan.base_model if choice.model == "base" else plan.model
            for p in protocol.prompts:
                jax.block_until_ready(generate(model, p.ids[None], max_new_tokens=protocol.new_tokens,
                                               policy=plan.policies[choice.label], stop_tokens=protocol.stops))

    class _Quiet:
        def update(self, n):
            pass

    meter = EnergyMeter(energy_config)
    warmed: set = set()

    def loop():
        with tempfile.TemporaryDirectory() as tmp:
            store = RecordFile(Path(tmp) / "out", plan.settings)
            runner = _Runner(plan, meter, store, _Quiet())
            runner.warmed = warmed
            try:
                runner.run()
            finally:
                store.close()

    try:
        bare()
        loop()  # compiles and warms the runner's programs, and loads the metric libraries
        times = {"bare": [], "loop": []}
        for _ in range(repeats):
            for name, fn in (("bare", bare), ("loop", loop)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        meter.close()
    n = len(protocol.prompts) * len(plan.choices)
    bare_s, loop_s = (statistics.median(times[k]) / n for k in ("bare", "loop"))
    return {"checkpoint": str(checkpoint), "policies": [c.label for c in plan.choices],
            "records": n, "repeats": repeats,
            "new_tokens": protocol.new_tokens, "bare_s_per_sample": bare_s, "loop_s_per_sample": loop_s,
            "overhead_s_per_sample": loop_s - bare_s, "ratio": loop_s / bare_s, "target_ratio": TARGET_RATIO,
            "device": jax.devices()[0].device_kind, "times_s": times}


def format_bench_eval(result: dict) -> str:
    """The header, both sides' milliseconds per record and their ratio beside the target."""
    return (f"bench eval: {result['checkpoint']}, {', '.join(result['policies'])}, {result['records']} records of "
            f"{result['new_tokens']} tokens, batch 1, {result['device']}, median of {result['repeats']}\n"
            f"  generate alone    {1000 * result['bare_s_per_sample']:9.3f} ms/record\n"
            f"  evaluation loop   {1000 * result['loop_s_per_sample']:9.3f} ms/record "
            f"(+{1000 * result['overhead_s_per_sample']:.3f} ms: window, decode, metrics, record)\n"
            f"  ratio             {result['ratio']:9.3f}  (target <= {result['target_ratio']})")
