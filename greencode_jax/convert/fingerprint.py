"""Identities that later stages compare: the model's weights, and the tokenizer a model directory holds.

The weights' fingerprint hashes, for every Hugging Face-named tensor in the export mapping's
order, its name, its shape and its first 256 values as float32. It does not depend on the
layer layout (stacked or per-layer), the exit layers or execution flags, so a policy trained
on rollouts of a checkpoint matches that checkpoint however it is loaded. A checkpoint records
it (`save_checkpoint`) and a model loaded from one carries the recorded value, so a bfloat16
load of a float32 checkpoint has the checkpoint's fingerprint; other models compute it on
first use and keep it in `model.origin`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from flax import nnx

from greencode_jax.convert.checkpoint import CONFIG_NAME, TOKENIZER_KEY, is_checkpoint
from greencode_jax.convert.hf_import import resolve_model_dir
from greencode_jax.convert.mapping import param_table, parameter_arrays
from greencode_jax.data.tokenizer import tokenizer_fingerprint
from greencode_jax.errors import GreencodeError

PREFIX_VALUES = 256


def compute_model_fingerprint(model) -> str:
    """The fingerprint of `model`'s weights as they are now (see the module docstring)."""
    config = model.config
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    digest = hashlib.sha256()
    for path, entry, names in parameter_arrays(param_table(config), config):
        value = flat[path]
        stacked = entry.per_layer and config.scan_layers  # one array holding every layer's tensor
        shape = list(value.shape[1:] if stacked else value.shape)
        rows = np.asarray(value.reshape(len(names), -1)[:, :PREFIX_VALUES], np.float32)  # only these leave the device
        for name, row in zip(names, rows):
            digest.update(json.dumps([name, shape]).encode())
            digest.update(np.ascontiguousarray(row, "<f4").tobytes())
    if model.exit_heads is not None:  # trained heads change every exit's prediction: they are part of the model
        for path, value in sorted(flat.items()):
            if path[0] == "exit_heads":
                digest.update(json.dumps([list(map(str, path)), list(value.shape)]).encode())
                digest.update(np.ascontiguousarray(np.asarray(value, np.float32), "<f4").tobytes())  # small: all
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """The recorded fingerprint `model` carries, else computed now and kept with it."""
    origin = model.origin
    if origin.fingerprint is None:
        model.origin = dataclasses.replace(origin, fingerprint=compute_model_fingerprint(model))
    return model.origin.fingerprint


def model_tokenizer_fingerprint(model_dir) -> str | None:
    """The fingerprint of the tokenizer a model directory holds (`data.tokenizer.tokenizer_fingerprint`):
    what a greencode checkpoint recorded, else computed from its tokenizer files; None when it
    holds none."""
    model_dir = Path(model_dir)
    if is_checkpoint(model_dir):
        try:
            meta = json.loads((model_dir / CONFIG_NAME).read_text())
        except (OSError, ValueError) as error:
            raise GreencodeError(f"{model_dir / CONFIG_NAME}: unreadable ({error})") from None
        if isinstance(meta, dict) and TOKENIZER_KEY in meta:
            return meta[TOKENIZER_KEY]
    return tokenizer_fingerprint(model_dir)


def check_corpus_tokenizer(data, model_path, model, what: str = "the model"):
    """Refuses the prepared corpus `data` (`PreparedData`) for `model`, loaded from `model_path`
    (a directory, hub id or GGUF file), when their tokenizers differ."""
    # The directory it was loaded from (a hub id's download, a GGUF file's conversion).
    model_dir = Path(model.origin.path) if model.origin.path else resolve_model_dir(model_path)
    data.check_model_tokenizer(f"{what} {model_path}", model_tokenizer_fingerprint(model_dir),
                               model.config.vocab_size, model_dir)
