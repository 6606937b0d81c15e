"""`EarlyExitLM` -> a Hugging Face directory that transformers' PyTorch classes load.

config.json comes from transformers' own config class; weights are safetensors
with `{"format": "pt"}` metadata, sharded with an index past `max_shard_bytes`.
The same mapping table as the import drives the names.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from flax import nnx

from greencode_jax.atomic import atomic_directory, usual_permissions
from greencode_jax.convert.checkpoint import copy_tokenizer_files
from greencode_jax.convert.exit_heads import FILE_NAME as EXIT_HEADS_FILE, save_exit_heads
from greencode_jax.convert.mapping import param_table, parameter_arrays
from greencode_jax.models import EarlyExitLM

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@contextlib.contextmanager
def quiet_transformers():
    """Within the block, transformers' own progress bars ("Loading weights", "Writing model
    shards") are not drawn: where we call transformers as a library (the benchmarks' reference,
    GGUF conversion) our command prints its own progress. Hugging Face Hub download bars are kept
    (transformers' `disable_progress_bar()` would turn those off too)."""
    from transformers.utils import logging as hf_logging

    def silent(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True})

    previous = hf_logging.set_tqdm_hook(silent)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def _hf_arrays(model: EarlyExitLM):
    """Yields (our array, HF names it holds, whether it stacks them on a leading layer axis) in
    the table's order, for either layer layout."""
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, entry, names in parameter_arrays(param_table(model.config), model.config):
        yield flat[path], names, entry.per_layer and model.config.scan_layers


def _hf_tensors(model: EarlyExitLM):
    """Yields (hf_name, numpy array) one tensor at a time."""
    for value, names, stacked in _hf_arrays(model):
        for layer, name in enumerate(names):  # a stacked array of a 1-layer model still has its layer axis
            tensor = np.asarray(value[layer] if stacked else value)
            yield name, np.ascontiguousarray(tensor)


def _shards(model: EarlyExitLM, max_shard_bytes: int):
    """Groups tensor names into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for value, names, _ in _hf_arrays(model):
        nbytes = value.nbytes // len(names)
        for name in names:
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
    if current:
        shards.append(current)
    return shards


def _save_shard(tensors: dict, path: Path):
    from safetensors.numpy import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    usual_permissions(path)  # safetensors writes through an owner-only (0600) temporary file


def export_pretrained(model: EarlyExitLM, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False, tokenizer_dir=None, inputs: dict | None = None) -> Path:
    """Writes config.json + safetensors (+ tokenizer files of the source) to `out_dir`, atomically.
    An existing `out_dir` is replaced (with `overwrite`) only when it is an export greencode-jax
    wrote and none of `inputs`."""
    out_dir = Path(out_dir)
    shards = _shards(model, max_shard_bytes)
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    file_names = (["model.safetensors"] if len(shards) == 1 else
                  [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with atomic_directory(out_dir, overwrite, kind="hf-export", inputs=inputs) as tmp:
        config = model.config.to_hf()
        config.dtype = TORCH_DTYPE_NAMES[np.dtype(model.dtype).name]
        config.save_pretrained(tmp)
        pending, current_shard, total = {}, 0, 0
        weight_map = {}
        for name, tensor in _hf_tensors(model):
            shard = shard_of[name]
            if shard != current_shard:
                _save_shard(pending, tmp / file_names[current_shard])
                pending, current_shard = {}, shard
            pending[name] = tensor
            weight_map[name] = file_names[shard]
            total += tensor.nbytes
        _save_shard(pending, tmp / file_names[current_shard])
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir or model.origin.path, tmp)
        save_exit_heads(model, tmp / EXIT_HEADS_FILE)  # beside the stock directory (none without heads)
    return out_dir
