"""`greencode bench forward`: prefill throughput against transformers PyTorch, and import memory.

Both sides run the same weights (a built-in random shape, or `--model DIR`) on the same
prompt in the same process; the import memory is measured in a fresh subprocess so earlier
allocations do not hide the peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from greencode_jax.bench.report import Progress, printer, verdict
from greencode_jax.bench.zoo import (bench_models, bench_source, build_reference, interleaved_seconds, runtime_label,
                                     synchronize, torch_device as choose_torch_device, weight_file_bytes)
from greencode_jax.convert import load_pretrained, save_checkpoint
from greencode_jax.convert.hf_export import quiet_transformers
from greencode_jax.errors import GreencodeError

TARGET_SPEED_RATIO = 1.0  # our prefill tokens/s >= 1.0x PyTorch's (opt-125m, 512 tokens, fp32, CPU)
TARGET_MEMORY_RATIO = 1.5  # import peak RSS <= 1.5x the checkpoint's size

_MEMORY_PROBE = r"""
import json, sys, psutil
import jax
jax.devices()
import greencode_jax as gc
# Warm up every code path on a tiny model first, so the baseline already holds the
# libraries' own memory and the growth is what the import of this checkpoint costs.
gc.load_pretrained(sys.argv[3], dtype=sys.argv[2])
baseline = psutil.Process().memory_info().rss
model = gc.load_pretrained(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
# VmHWM is this process image's own peak; ru_maxrss would include the parent's RSS at fork.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"baseline_rss": baseline, "peak_rss": peak}))
"""


def run_bench_forward(*, shape: str | None = None, model: str | None = None, tokens: int = 512, batch: int = 1,
                      dtype: str = "float32", repeats: int = 5, torch_device: str | None = None,
                      skip_memory: bool = False, progress: Progress | None = None) -> dict:
    """Prefill tokens/s of our model in both layer layouts against transformers' forward on the same
    weights and ids, and (unless `skip_memory`) the peak memory of importing the weights. `shape` or
    `model` (a Hugging Face directory or greencode checkpoint) names the weights; the header line
    goes to `progress`."""
    import torch

    if tokens <= 0 or batch <= 0 or repeats <= 0:
        raise GreencodeError("--tokens, --batch and --repeats must be positive")
    shape, model_path = bench_source(shape, model)
    device = choose_torch_device(torch_device)
    with bench_models(shape, model_path, dtype, scan_layers=True) as loaded:
        ours, reference = loaded.model, loaded.reference.to(device)
        printer(progress)(f"bench forward: {loaded.label}, batch {batch} x {tokens} tokens, {dtype}, {repeats} timed "
                          f"runs; {runtime_label(device)}")
        if tokens > ours.config.max_position_embeddings:
            raise GreencodeError(f"--tokens {tokens} exceeds the model's {ours.config.max_position_embeddings} "
                                 "positions")
        results = {"shape": shape, "model": model_path, "tokens": tokens, "batch": batch, "dtype": dtype,
                   "device": str(jax.devices()[0]), "torch_device": device, "torch_threads": torch.get_num_threads()}
        if not skip_memory:
            results["memory"] = import_memory(loaded.source_dir, dtype,
                                              weight_file_bytes(loaded.source_dir, loaded.is_checkpoint),
                                              loaded.family, loaded.is_checkpoint)
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (batch, tokens))
    results.update(_time_prefill(ours, reference, ids, device, repeats))
    return results


def _time_prefill(model, reference, ids, device: str, repeats: int) -> dict:
    """Compile time of each layer layout, then medians of interleaved runs of both layouts and PyTorch."""
    import torch

    torch_ids = torch.tensor(ids, device=device)
    per_layer = nnx.clone(model).set_scan_layers(False)  # a copy, in the decoding layout
    candidates = {"stacked": lambda: jax.block_until_ready(model.logits(ids)),
                  "per_layer": lambda: jax.block_until_ready(per_layer.logits(ids))}
    results = {}
    for name, run in candidates.items():
        start = time.perf_counter()
        run()
        results[f"jax_compile_s_{name}"] = time.perf_counter() - start

    def run_torch():
        with torch.inference_mode():
            logits = reference(torch_ids).logits
        synchronize(device)
        return logits

    candidates["torch"] = run_torch
    for _ in range(2):  # warm-up
        run_torch()
    times = interleaved_seconds(candidates, repeats)
    theirs = times.pop("torch")
    ours = min(times.values())
    results["jax_layout_seconds"] = times
    results["jax_best_layout"] = min(times, key=times.get)
    n = ids.size
    results.update(jax_tokens_per_s=n / ours, torch_tokens_per_s=n / theirs, speed_ratio=theirs / ours,
                   speed_target=TARGET_SPEED_RATIO)
    return results


def import_memory(model_dir, dtype: str, checkpoint_bytes: int, family: str, is_checkpoint: bool = False) -> dict:
    """Peak RSS growth of importing `model_dir` in a fresh process, against the weights' size on disk."""
    with tempfile.TemporaryDirectory() as warmup_dir:
        warmup = Path(warmup_dir) / "hf"
        with quiet_transformers():
            build_reference(f"tiny-{family}", dtype).save_pretrained(warmup)
        if is_checkpoint:  # warm up the reader the measured import uses
            warmup = save_checkpoint(load_pretrained(warmup, dtype=dtype), Path(warmup_dir) / "checkpoint")
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model_dir), dtype, str(warmup)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise GreencodeError(f"import memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = probe["peak_rss"] - probe["baseline_rss"]
    return {"checkpoint_bytes": checkpoint_bytes, "baseline_rss": probe["baseline_rss"], "peak_rss": probe["peak_rss"],
            "import_growth_bytes": growth, "growth_ratio": growth / checkpoint_bytes, "target": TARGET_MEMORY_RATIO}


def format_bench_forward(r: dict) -> str:
    """The figures of `run_bench_forward`, each beside its bound."""
    mib = 1024**2
    tokens = r["batch"] * r["tokens"]
    lines = [f"  greencode-jax, {layout + ' layers':17s}{tokens / seconds:10.1f} tokens/s   "
             f"(compile {r['jax_compile_s_' + layout]:.1f} s)" for layout, seconds in r["jax_layout_seconds"].items()]
    lines += [f"  greencode-jax prefill      {r['jax_tokens_per_s']:10.1f} tokens/s   ({r['jax_best_layout']} layout)",
              f"  transformers PyTorch       {r['torch_tokens_per_s']:10.1f} tokens/s",
              f"  ratio ours / PyTorch       {r['speed_ratio']:10.2f} x   (target >= {r['speed_target']:.1f} x: "
              f"{verdict(r['speed_ratio'] >= r['speed_target'])})"]
    if "memory" in r:
        m = r["memory"]
        lines += [f"  checkpoint size            {m['checkpoint_bytes'] / mib:10.1f} MiB",
                  f"  import peak RSS growth     {m['import_growth_bytes'] / mib:10.1f} MiB  = {m['growth_ratio']:.2f} x "
                  f"checkpoint (target <= {m['target']:.1f} x: {verdict(m['growth_ratio'] <= m['target'])}); "
                  f"process peak {m['peak_rss'] / mib:.0f} MiB over a {m['baseline_rss'] / mib:.0f} MiB baseline"]
    return "\n".join(lines)
