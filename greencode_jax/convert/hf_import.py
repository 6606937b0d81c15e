"""Hugging Face checkpoint -> `EarlyExitLM`, streaming one tensor at a time."""

from __future__ import annotations

import re
from pathlib import Path

import jax
from flax import nnx

from greencode_jax.convert.exit_heads import FILE_NAME as EXIT_HEADS_FILE, attach_exit_heads
from greencode_jax.convert.gguf import gguf_model_dir, is_gguf
from greencode_jax.convert.host import host_buffer, to_jax
from greencode_jax.convert.mapping import (
    IGNORED_SUFFIXES, canonical_name, hf_names, param_table, parameter_arrays,
)
from greencode_jax.convert.readers import TensorSource
from greencode_jax.errors import GreencodeError
from greencode_jax.models import EarlyExitLM, ModelConfig, Origin, abstract_model, resolve_dtype
from greencode_jax.models.config import load_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"]


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory as is; a Llama GGUF file as the Hugging Face directory it converts to
    (cached); a hub id (only when no such local path exists) is downloaded."""
    local = Path(path)
    if is_gguf(local):
        return gguf_model_dir(local)
    if local.exists():
        if not local.is_dir():
            raise GreencodeError(f"{local}: expected a model directory or a .gguf file, found another file")
        return local
    if local.suffix.lower() == ".gguf":
        raise GreencodeError(f"{local}: no such GGUF file (scripts/setup --real-model installs SmolLM2-135M's "
                             "under models/)")
    if HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), allow_patterns=HF_FILES))
        except Exception as error:
            raise GreencodeError(f"{path}: no such local directory, and downloading it as a Hugging Face hub id "
                                 f"failed ({str(error).splitlines()[0][:200]})") from None
    raise GreencodeError(
        f"{path}: no such directory (expected a Hugging Face model directory, a greencode checkpoint, "
        "a Llama .gguf file, or a hub id such as facebook/opt-125m)")


def load_hf(model_dir: str | Path, dtype="float32", exit_layers=None, scan_layers: bool = True) -> EarlyExitLM:
    """Reads a Hugging Face model directory (config.json + safetensors or pytorch_model.bin)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_hf(load_json(model_dir / "config.json", "Hugging Face config"),
                                 exit_layers=exit_layers, source=str(model_dir / "config.json"))
    config = config.replace(scan_layers=scan_layers)
    dtype = resolve_dtype(dtype)
    source = TensorSource(model_dir)
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    flat_abstract = {path: leaf for path, leaf in nnx.to_flat_state(abstract_state)}

    table = param_table(config)
    _check_names(source, {name for entry in table for name in hf_names(entry, config.num_layers)}, config, model_dir)

    # One parameter array at a time, in table order: read its tensors (every layer's,
    # for a stacked one) into a host buffer, hand that to JAX, free it before the next.
    present = {canonical_name(n): n for n in source.names()}
    arrays: dict[tuple, jax.Array] = {}
    for path, entry, names in parameter_arrays(table, config):
        our_shape = tuple(flat_abstract[path].get_value().shape)
        stacked = len(names) > 1 or (entry.per_layer and config.scan_layers)
        expected = tuple(our_shape[1:] if stacked else our_shape)  # PyTorch's layout is ours
        buffer, view = host_buffer(our_shape, dtype)
        for layer, name in enumerate(names):
            raw_name = present[name]
            if source.shape(raw_name) != expected:
                raise GreencodeError(f"{source.file_of(raw_name)}: tensor '{raw_name}' has shape "
                                     f"{list(source.shape(raw_name))}, expected {list(expected)} for this config")
            tensor = source.read(raw_name)
            target = view[layer] if stacked else view
            target[...] = tensor  # casts to the requested dtype
            del tensor
        arrays[path] = to_jax(buffer, dtype)
        del buffer, view

    state = nnx.from_flat_state({path: flat_abstract[path].replace(arrays[path]) for path in flat_abstract})
    model = nnx.merge(graphdef, state)
    model.origin = Origin(str(model_dir))
    if (model_dir / EXIT_HEADS_FILE).is_file():  # an export of a model with exit heads (convert/exit_heads.py)
        attach_exit_heads(model, model_dir / EXIT_HEADS_FILE, requested_exits=exit_layers)
    return model


def _check_names(source: TensorSource, targets: set[str], config: ModelConfig, model_dir: Path):
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
