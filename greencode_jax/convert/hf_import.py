"""Hugging Face checkpoint -> `EarlyExitLM`, streaming one tensor at a time."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from greencode_jax.convert.mapping import IGNORED_SUFFIXES, Entry, canonical_name, hf_names, param_table
from greencode_jax.convert.readers import TensorSource
from greencode_jax.errors import GreencodeError
from greencode_jax.models import EarlyExitLM, ModelConfig, abstract_model, resolve_dtype
from greencode_jax.models.config import load_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"]


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory as is; a hub id (only when no such local path exists) is downloaded."""
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise GreencodeError(f"{local}: expected a model directory, found a file")
        return local
    if HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), allow_patterns=HF_FILES))
        except Exception as error:
            raise GreencodeError(f"{path}: could not download from the Hugging Face hub ({error})") from None
    raise GreencodeError(
        f"{path}: no such directory (expected a Hugging Face model directory, a greencode checkpoint, "
        "or a hub id such as facebook/opt-125m)")


def _hf_shape(entry: Entry, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = our_shape[1:] if entry.per_layer else our_shape
    return tuple(reversed(shape)) if entry.transpose else tuple(shape)


def load_hf(model_dir: str | Path, dtype="float32", exit_layers=None) -> EarlyExitLM:
    """Reads a Hugging Face model directory (config.json + safetensors or pytorch_model.bin)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_hf(load_json(model_dir / "config.json", "Hugging Face config"),
                                 exit_layers=exit_layers, source=str(model_dir / "config.json"))
    dtype = resolve_dtype(dtype)
    source = TensorSource(model_dir)
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    flat_abstract = {path: leaf for path, leaf in nnx.to_flat_state(abstract_state)}

    # Where each HF tensor goes: (entry, layer index or None).
    table = param_table(config)
    targets: dict[str, tuple[Entry, int | None]] = {}
    for entry in table:
        for layer, name in enumerate(hf_names(entry, config.num_layers)):
            targets[name] = (entry, layer if entry.per_layer else None)
    _check_names(source, targets, config, model_dir)

    buffers: dict[tuple[str, ...], np.ndarray] = {}
    remaining = {entry.path: (config.num_layers if entry.per_layer else 1) for entry in table}
    arrays: dict[tuple[str, ...], jax.Array] = {}
    np_dtype = np.dtype(dtype)
    for raw_name, tensor in source.iter_tensors():
        name = canonical_name(raw_name)
        if name not in targets:
            continue  # ignorable, already vetted by _check_names
        entry, layer = targets[name]
        our_shape = tuple(flat_abstract[entry.path].value.shape)
        expected = _hf_shape(entry, our_shape)
        if tuple(tensor.shape) != expected:
            raise GreencodeError(f"{source.file_of(raw_name)}: tensor '{raw_name}' has shape {list(tensor.shape)}, "
                                 f"expected {list(expected)} for this config")
        value = tensor.T if entry.transpose else tensor
        if entry.path not in buffers:
            buffers[entry.path] = np.empty(our_shape, np_dtype)
        if layer is None:
            buffers[entry.path][...] = value.astype(np_dtype, copy=False)
        else:
            buffers[entry.path][layer] = value.astype(np_dtype, copy=False)
        del tensor, value
        remaining[entry.path] -= 1
        if remaining[entry.path] == 0:  # complete: hand it to JAX and free the host buffer
            arrays[entry.path] = jax.device_put(buffers.pop(entry.path))

    state = nnx.from_flat_state({path: flat_abstract[path].replace(arrays[path]) for path in flat_abstract})
    model = nnx.merge(graphdef, state)
    model.source = str(model_dir)
    return model


def _check_names(source: TensorSource, targets: dict, config: ModelConfig, model_dir: Path):
    present = {canonical_name(n): n for n in source.names()}
    missing = [name for name in targets if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GreencodeError(f"{model_dir}: tensor '{missing[0]}' is missing from the checkpoint{more}")
    tied_head = config.tie_word_embeddings and "lm_head.weight" in present
    unexpected = [raw for name, raw in present.items()
                  if name not in targets and not name.endswith(IGNORED_SUFFIXES)
                  and not (tied_head and name == "lm_head.weight")]
    if unexpected:
        raise GreencodeError(f"{source.file_of(unexpected[0])}: unexpected tensor '{unexpected[0]}' for a "
                             f"{config.family} model with this config.json (is model_type right?)")
