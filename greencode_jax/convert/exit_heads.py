"""Exit heads beside a Hugging Face directory: `exit_heads.safetensors`.

The export leaves the Hugging Face directory stock (transformers loads it as the plain model it
is) and writes the heads beside it, one set of tensors per exit layer that has a head:

    exit_heads.layer_{l}.bias     [E]
    exit_heads.layer_{l}.weight   [E, E]     affine heads:  h' = h + h @ weight + bias
    exit_heads.layer_{l}.down     [E, r]     lowrank heads: h' = h + (h @ down) @ up + bias
    exit_heads.layer_{l}.up       [r, E]

with metadata {"format": "greencode-exit-heads", "version": "1", "kind", "rank", "exit_layers"
(JSON list), "hidden_size", "num_layers"}. h is decoder layer l's output; h' goes through the
model's own final norm (and OPT's project_out) and LM head. `load_pretrained` of such a directory
attaches the heads, so its exit logits equal the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from greencode_jax.atomic import usual_permissions
from greencode_jax.errors import GreencodeError
from greencode_jax.models.heads import ExitHeads

FILE_NAME = "exit_heads.safetensors"
FORMAT = "greencode-exit-heads"
NAMES = {"affine": ("weight", "bias"), "lowrank": ("down", "up", "bias")}


def save_exit_heads(model, path: Path):
    """Writes `model`'s exit heads to `path` (a model without heads writes nothing)."""
    from safetensors.numpy import save_file

    heads = model.exit_heads
    if heads is None:
        return
    c = model.config
    tensors = {}
    for slot, layer in enumerate(heads.head_layers):
        for name in NAMES[heads.kind]:
            value = getattr(heads, name)[...][slot]
            tensors[f"exit_heads.layer_{layer}.{name}"] = np.ascontiguousarray(np.asarray(value, np.float32))
    metadata = {"format": FORMAT, "version": "1", "kind": heads.kind, "rank": str(c.exit_head_rank),
                "exit_layers": json.dumps(list(heads.head_layers)), "hidden_size": str(c.hidden_size),
                "num_layers": str(c.num_layers)}
    save_file(tensors, str(path), metadata=metadata)
    usual_permissions(path)


def read_exit_heads(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of an exit heads file, checked to be one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as error:
        raise GreencodeError(f"{path}: unreadable exit heads file ({error})") from None
    if metadata.get("format") != FORMAT or metadata.get("kind") not in NAMES:
        raise GreencodeError(f"{path}: not a greencode exit heads file (expected metadata format {FORMAT!r})")
    try:
        metadata = {**metadata, "rank": int(metadata["rank"]), "exit_layers": json.loads(metadata["exit_layers"]),
                    "hidden_size": int(metadata["hidden_size"]), "num_layers": int(metadata["num_layers"])}
    except (KeyError, ValueError) as error:
        raise GreencodeError(f"{path}: exit heads metadata incomplete ({error})") from None
    return metadata, tensors


def attach_exit_heads(model, path: Path, requested_exits=None):
    """Gives `model` the heads stored at `path`. The file must be for a model of the same shape
    (hidden size and layer count); the model's exits become the file's head layers (and the last
    layer), which `requested_exits`, when given, must name."""
    metadata, tensors = read_exit_heads(path)
    c = model.config
    if (metadata["hidden_size"], metadata["num_layers"]) != (c.hidden_size, c.num_layers):
        raise GreencodeError(f"{path}: exit heads for a model of {metadata['num_layers']} layers and hidden size "
                             f"{metadata['hidden_size']}, but this model has {c.num_layers} layers and hidden size "
                             f"{c.hidden_size}")
    if model.exit_heads is not None:
        raise GreencodeError(f"{path}: the model already has exit heads ({c.exit_head}); load it without this file")
    layers = [int(layer) for layer in metadata["exit_layers"]]
    if requested_exits is not None and sorted(set(requested_exits) - {c.num_layers - 1}) != sorted(layers):
        raise GreencodeError(f"{path}: heads for exit layers {layers}, but exit layers {list(requested_exits)} were "
                             "asked for; the heads are trained for their own exits")
    config = c.replace(exit_layers=tuple(layers), exit_head=metadata["kind"],
                       exit_head_rank=metadata["rank"] if metadata["kind"] == "lowrank" else 0)
    heads = ExitHeads(config, model.dtype, nnx.Rngs(0))
    for name in NAMES[metadata["kind"]]:
        expected = getattr(heads, name)[...].shape[1:]
        stacked = []
        for layer in layers:
            key = f"exit_heads.layer_{layer}.{name}"
            if key not in tensors or tensors[key].shape != expected:
                found = "missing" if key not in tensors else f"of shape {list(tensors[key].shape)}"
                raise GreencodeError(f"{path}: tensor {key!r} is {found}, expected shape {list(expected)}")
            stacked.append(tensors[key])
        getattr(heads, name).set_value(jnp.asarray(np.stack(stacked), model.dtype))
    model.exit_heads = nnx.data(heads)
    model.config = config
    return model
