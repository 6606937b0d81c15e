"""`greencode bench forward`: prefill throughput against transformers PyTorch, and import memory.

Both sides run the same weights (a built-in random shape, or `--model DIR`) on the same
prompt in the same process; the import memory is measured in a fresh subprocess so earlier
allocations do not hide the peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from greencode_jax.errors import GreencodeError

SHAPES = {
    "opt-125m": ("opt", dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                             num_attention_heads=12, max_position_embeddings=2048)),
    "opt-350m": ("opt", dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                             num_attention_heads=16, max_position_embeddings=2048, word_embed_proj_dim=512,
                             do_layer_norm_before=False)),
    "llama-160m": ("llama", dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, intermediate_size=3072,
                                 num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)),
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings), for the GPU figures
    "llama-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                               tie_word_embeddings=True, rope_theta=500000.0)),
    "llama-10m": ("llama", dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, intermediate_size=1024,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)),
    "tiny-opt": ("opt", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                             num_attention_heads=4, max_position_embeddings=1024)),
    "tiny-llama": ("llama", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
}

TARGET_SPEED_RATIO = 1.0  # issue 2: our prefill tokens/s >= 1.0x PyTorch's (opt-125m, 512 tokens, fp32, CPU)
TARGET_MEMORY_RATIO = 1.5  # issue 2: import peak RSS <= 1.5x the checkpoint's size

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


def torch_device(name: str | None = None) -> str:
    """The device the PyTorch reference runs on: `name`, else CUDA when JAX runs on a GPU and torch sees one."""
    import jax
    import torch

    if name is None:
        name = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GreencodeError("--torch-device cuda: this torch build sees no CUDA device")
    return name


def synchronize(device: str):
    """Waits for queued PyTorch work on `device`, so a wall-clock time covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def build_reference(shape: str, dtype: str, device: str = "cpu"):
    import torch
    import transformers

    if shape not in SHAPES:
        raise GreencodeError(f"--shape {shape!r}: unknown; choose one of {sorted(SHAPES)}")
    family, fields = SHAPES[shape]
    config_class = transformers.OPTConfig if family == "opt" else transformers.LlamaConfig
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**fields))
    return model.to(getattr(torch, dtype)).to(device).eval()


DEFAULT_SHAPE = "opt-125m"


def bench_source(args) -> tuple[str | None, str | None]:
    """(shape, model) from `--shape` and `--model`: one of the two (the default shape when neither)."""
    model = getattr(args, "model", None)
    if model is not None and args.shape is not None:
        raise GreencodeError(f"--shape {args.shape} and --model {model}: give one of the two")
    return (None, model) if model is not None else (args.shape or DEFAULT_SHAPE, None)


@dataclasses.dataclass
class BenchModels:
    label: str  # what the header names: "shape opt-125m" or "model DIR (a Hugging Face directory)"
    model: object  # ours (EarlyExitLM)
    reference: object  # transformers' model on the CPU, in eval mode
    source_dir: Path  # what our model was loaded from
    family: str
    is_checkpoint: bool  # source_dir is a greencode checkpoint (else a Hugging Face directory)


@contextlib.contextmanager
def bench_models(shape: str | None, model_path: str | None, dtype: str, exit_layers=None, scan_layers=None):
    """Our model and transformers' on the same weights: a built-in random shape, or `model_path`, a
    Hugging Face directory (transformers loads it as is) or our checkpoint (exported for transformers
    to a temporary directory with `export_pretrained`). Its directories live until the block ends."""
    import torch
    import transformers

    import greencode_jax as gc
    from greencode_jax.convert.hf_export import quiet_transformers

    with tempfile.TemporaryDirectory() as tmp:
        if model_path is None:
            reference = build_reference(shape, dtype)
            with quiet_transformers():
                reference.save_pretrained(tmp)
            model = gc.load_pretrained(tmp, dtype=dtype, exit_layers=exit_layers, scan_layers=scan_layers)
            yield BenchModels(f"shape {shape}", model, reference, Path(tmp), model.config.family, False)
            return
        from greencode_jax.convert import resolve_model_dir
        from greencode_jax.convert.checkpoint import is_checkpoint

        source_dir = resolve_model_dir(model_path)
        checkpoint = is_checkpoint(source_dir)
        model = gc.load_pretrained(source_dir, dtype=dtype, exit_layers=exit_layers, scan_layers=scan_layers)
        hf_dir = gc.export_pretrained(model, Path(tmp) / "hf") if checkpoint else source_dir
        try:
            with quiet_transformers():
                reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
        except Exception as error:
            why = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise GreencodeError(f"--model {model_path}: transformers cannot load {hf_dir} for the reference ({why})"
                                 ) from None
        kind = "a greencode checkpoint" if checkpoint else "a Hugging Face directory"
        yield BenchModels(f"model {model_path} ({kind}, {model.config.family}, {model.config.num_layers} layers)",
                          model, reference.eval(), source_dir, model.config.family, checkpoint)


def weight_file_bytes(model_dir: Path, is_checkpoint: bool) -> int:
    """The weights' size on disk: the safetensors (else pytorch_model*.bin) of a Hugging Face directory,
    every file of our checkpoint."""
    if is_checkpoint:
        return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file())
    files = list(Path(model_dir).glob("*.safetensors")) or list(Path(model_dir).glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files)


def _interleaved_seconds(candidates: dict, repeats: int) -> dict:
    """Median seconds of each candidate, run in turn so background load hits all alike."""
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_bench_forward(args) -> dict:
    import jax
    import numpy as np
    import torch

    from flax import nnx

    if args.tokens <= 0 or args.batch <= 0 or args.repeats <= 0:
        raise GreencodeError("--tokens, --batch and --repeats must be positive")
    shape, model_path = bench_source(args)
    device = torch_device(args.torch_device)
    with bench_models(shape, model_path, args.dtype, scan_layers=True) as loaded:
        model, reference = loaded.model, loaded.reference.to(device)
        print(f"bench forward: {loaded.label}, batch {args.batch} x {args.tokens} tokens, {args.dtype}, "
              f"{args.repeats} timed runs; JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch "
              f"{torch.__version__} on {device}"
              f"{'' if device == 'cuda' else f' with {torch.get_num_threads()} threads'}", flush=True)
        if args.tokens > model.config.max_position_embeddings:
            raise GreencodeError(f"--tokens {args.tokens} exceeds the model's {model.config.max_position_embeddings} "
                                 "positions")
        results = {"shape": shape, "model": model_path, "tokens": args.tokens, "batch": args.batch,
                   "dtype": args.dtype, "device": str(jax.devices()[0]), "torch_device": device,
                   "torch_threads": torch.get_num_threads()}
        if not args.skip_memory:
            results["memory"] = _import_memory(loaded.source_dir, args.dtype,
                                               weight_file_bytes(loaded.source_dir, loaded.is_checkpoint),
                                               loaded.family, loaded.is_checkpoint)

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.tokens))
    torch_ids = torch.tensor(ids, device=device)
    per_layer = nnx.clone(model).set_scan_layers(False)  # a copy, in the decoding layout
    candidates = {"stacked": lambda: jax.block_until_ready(model.logits(ids)),
                  "per_layer": lambda: jax.block_until_ready(per_layer.logits(ids))}
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
    times = _interleaved_seconds(candidates, args.repeats)
    theirs = times.pop("torch")
    ours = min(times.values())
    results["jax_layout_seconds"] = times
    results["jax_best_layout"] = min(times, key=times.get)

    tokens = args.batch * args.tokens
    results.update(jax_tokens_per_s=tokens / ours, torch_tokens_per_s=tokens / theirs,
                   speed_ratio=theirs / ours, speed_target=TARGET_SPEED_RATIO)
    _print_results(results)
    if args.json:
        from greencode_jax.atomic import write_json_output

        write_json_output(args.json, results, "benchmark")
    return results


def _import_memory(model_dir, dtype: str, checkpoint_bytes: int, family: str, is_checkpoint: bool = False) -> dict:
    import greencode_jax as gc
    from greencode_jax.convert.hf_export import quiet_transformers

    with tempfile.TemporaryDirectory() as warmup_dir:
        warmup = Path(warmup_dir) / "hf"
        with quiet_transformers():
            build_reference(f"tiny-{family}", dtype).save_pretrained(warmup)
        if is_checkpoint:  # warm up the reader the measured import uses
            warmup = gc.save_checkpoint(gc.load_pretrained(warmup, dtype=dtype), Path(warmup_dir) / "checkpoint")
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model_dir), dtype, str(warmup)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise GreencodeError(f"import memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = probe["peak_rss"] - probe["baseline_rss"]
    return {"checkpoint_bytes": checkpoint_bytes, "baseline_rss": probe["baseline_rss"], "peak_rss": probe["peak_rss"],
            "import_growth_bytes": growth, "growth_ratio": growth / checkpoint_bytes, "target": TARGET_MEMORY_RATIO}


def _print_results(r: dict):
    mib = 1024**2
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    tokens = r["batch"] * r["tokens"]
    for layout, seconds in r["jax_layout_seconds"].items():
        print(f"  greencode-jax, {layout + ' layers':17s}{tokens / seconds:10.1f} tokens/s   "
              f"(compile {r['jax_compile_s_' + layout]:.1f} s)")
    print(f"  greencode-jax prefill      {r['jax_tokens_per_s']:10.1f} tokens/s   ({r['jax_best_layout']} layout)")
    print(f"  transformers PyTorch       {r['torch_tokens_per_s']:10.1f} tokens/s")
    print(f"  ratio ours / PyTorch       {r['speed_ratio']:10.2f} x   (target >= {r['speed_target']:.1f} x: "
          f"{verdict(r['speed_ratio'] >= r['speed_target'])})")
    if "memory" in r:
        m = r["memory"]
        print(f"  checkpoint size            {m['checkpoint_bytes'] / mib:10.1f} MiB")
        print(f"  import peak RSS growth     {m['import_growth_bytes'] / mib:10.1f} MiB  = {m['growth_ratio']:.2f} x "
              f"checkpoint (target <= {m['target']:.1f} x: {verdict(m['growth_ratio'] <= m['target'])}); "
              f"process peak {m['peak_rss'] / mib:.0f} MiB over a {m['baseline_rss'] / mib:.0f} MiB baseline")
