"""What the model benchmarks share: the built-in model shapes, the PyTorch reference on the same
weights and the device it runs on, and interleaved timing.

`bench_models` gives our model and transformers' on the same weights: a built-in random shape,
or a Hugging Face directory or greencode checkpoint (`--model DIR`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import jax

from greencode_jax.convert import export_pretrained, load_pretrained, resolve_model_dir
from greencode_jax.convert.checkpoint import is_checkpoint
from greencode_jax.convert.hf_export import quiet_transformers
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
DEFAULT_SHAPE = "opt-125m"

def shape_fields(shape: str) -> tuple[str, dict]:
    """(family, a copy of the transformers config fields) of a built-in shape."""
    if shape not in SHAPES:
        raise GreencodeError(f"--shape {shape!r}: unknown; choose one of {sorted(SHAPES)}")
    family, fields = SHAPES[shape]
    return family, dict(fields)


def torch_device(name: str | None = None) -> str:
    """The device the PyTorch reference runs on: `name`, else CUDA when JAX runs on a GPU and torch sees one."""
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


def runtime_label(device: str) -> str:
    """Both sides of a comparison: 'JAX 0.9 on cpu, torch 2.13.0 on cpu with 2 threads'."""
    import torch

    return (f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {device}"
            f"{'' if device == 'cuda' else f' with {torch.get_num_threads()} threads'}")


def build_reference(shape: str, dtype: str, device: str = "cpu"):
    """transformers' model of a built-in shape, random weights from seed 0, in eval mode."""
    import torch
    import transformers

    family, fields = shape_fields(shape)
    config_class = transformers.OPTConfig if family == "opt" else transformers.LlamaConfig
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**fields))
    return model.to(getattr(torch, dtype)).to(device).eval()


def bench_source(shape: str | None, model: str | None) -> tuple[str | None, str | None]:
    """(shape, model) from `--shape` and `--model`: one of the two (the default shape when neither)."""
    if model is not None and shape is not None:
        raise GreencodeError(f"--shape {shape} and --model {model}: give one of the two")
    return (None, model) if model is not None else (shape or DEFAULT_SHAPE, None)


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
    with tempfile.TemporaryDirectory() as tmp:
        if model_path is None:
            reference = build_reference(shape, dtype)
            with quiet_transformers():
                reference.save_pretrained(tmp)
            model = load_pretrained(tmp, dtype=dtype, exit_layers=exit_layers, scan_layers=scan_layers)
            yield BenchModels(f"shape {shape}", model, reference, Path(tmp), model.config.family, False)
            return
        source_dir = resolve_model_dir(model_path)
        checkpoint = is_checkpoint(source_dir)
        model = load_pretrained(source_dir, dtype=dtype, exit_layers=exit_layers, scan_layers=scan_layers)
        hf_dir = export_pretrained(model, Path(tmp) / "hf") if checkpoint else source_dir
        reference = _load_reference(hf_dir, dtype, model_path)
        kind = "a greencode checkpoint" if checkpoint else "a Hugging Face directory"
        yield BenchModels(f"model {model_path} ({kind}, {model.config.family}, {model.config.num_layers} layers)",
                          model, reference.eval(), source_dir, model.config.family, checkpoint)


def _load_reference(hf_dir, dtype: str, model_path: str):
    import torch
    import transformers

    try:
        with quiet_transformers():
            return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    except Exception as error:
        why = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise GreencodeError(f"--model {model_path}: transformers cannot load {hf_dir} for the reference ({why})"
                             ) from None


def weight_file_bytes(model_dir: Path, is_checkpoint: bool) -> int:
    """The weights' size on disk: the safetensors (else pytorch_model*.bin) of a Hugging Face directory,
    every file of our checkpoint."""
    if is_checkpoint:
        return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file())
    files = list(Path(model_dir).glob("*.safetensors")) or list(Path(model_dir).glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files)


def seconds(fn) -> float:
    """Wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(candidates: dict, repeats: int) -> dict:
    """Seconds of each candidate per round, run in turn so background load hits all alike."""
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(seconds(fn))
    return times


def interleaved_seconds(candidates: dict, repeats: int) -> dict:
    """Median seconds of each candidate, run in turn so background load hits all alike."""
    return {name: statistics.median(values) for name, values in interleaved_times(candidates, repeats).items()}
