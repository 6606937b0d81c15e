"""Our own checkpoint: `greencode_config.json` (ModelConfig) + Orbax parameters + tokenizer files.

Layout of a checkpoint directory:
    greencode_config.json   {"format": "greencode-jax", "version": 2, "dtype": ..., "model": {...}}
    params/                 Orbax StandardCheckpointer tree of the model's parameters
    tokenizer files         copied from the Hugging Face source, when it had them

Version 2 stores Linear kernels [out, in] (PyTorch's layout); version 1 stored them [in, out]
and is still read, its kernels transposed on restore.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from greencode_jax.atomic import atomic_directory
from greencode_jax.errors import GreencodeError
from greencode_jax.models import EarlyExitLM, ModelConfig, Origin, abstract_model, resolve_dtype
from greencode_jax.models.config import load_json

CONFIG_NAME = "greencode_config.json"
FORMAT = "greencode-jax"
VERSION = 2  # 2: Linear kernels [out, in]; 1: [in, out]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def copy_tokenizer_files(source_dir, out_dir: Path) -> list[str]:
    copied = []
    if source_dir is None:
        return copied
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
            copied.append(name)
    return copied


def _checkpointer():
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    return ocp.StandardCheckpointer()


def save_checkpoint(model: EarlyExitLM, out: str | Path, overwrite: bool = False) -> Path:
    """Writes `model` as our checkpoint at `out`, atomically."""
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        meta = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(model.dtype).name,
                "model": model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        checkpointer = _checkpointer()
        checkpointer.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()
        copy_tokenizer_files(model.origin.path, tmp)
    return out


def _is_kernel(path) -> bool:
    return getattr(path[-1], "key", None) == "kernel"


def _swap_kernels(tree, swap):
    """`tree` with `swap` applied to every Linear kernel leaf (version 1 checkpoints)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: swap(x) if _is_kernel(path) else x, tree)


def restore_params(directory, abstract_params) -> dict:
    """Restores an Orbax parameter tree onto this process's first local device.

    `abstract_params` (an nnx State or pure dict with shape/dtype leaves, e.g. from
    `abstract_model`) gives the tree, shapes and dtypes (a different dtype casts). Every array
    gets a single-device target sharding: without one Orbax reuses the sharding recorded at
    save time, so parameters saved sharded over a mesh (a multi-device run's `final/`) would
    only restore on a machine with that same mesh ("Topology mismatch").
    """
    if isinstance(abstract_params, nnx.State):
        abstract_params = nnx.to_pure_dict(abstract_params)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
    return _checkpointer().restore(directory, target)


def load_checkpoint(path: str | Path, dtype=None, exit_layers=None, scan_layers: bool | None = None) -> EarlyExitLM:
    """Reads our checkpoint; `dtype` casts on restore (default: the dtype it was saved in).

    Parameters are restored in the layer layout they were saved in, then converted in
    place when `scan_layers` asks for the other one.
    """
    path = Path(path)
    meta = load_json(path / CONFIG_NAME, "greencode checkpoint config")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise GreencodeError(f"{path / CONFIG_NAME}: not a greencode-jax checkpoint config")
    version = meta.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise GreencodeError(f"{path / CONFIG_NAME}: checkpoint format version {version!r}; this greencode-jax "
                             f"reads versions 1 to {VERSION} (a newer release wrote it?)")
    config = ModelConfig.from_dict(meta["model"], source=str(path / CONFIG_NAME))
    if exit_layers is not None:
        config = config.replace(exit_layers=exit_layers)
    dtype = resolve_dtype(dtype or meta.get("dtype", "float32"))
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    if not (path / "params").is_dir():
        raise GreencodeError(f"{path}: checkpoint has no params/ directory")
    target = nnx.to_pure_dict(abstract_state)
    if version == 1:  # kernels were saved [in, out]
        target = _swap_kernels(target, lambda x: jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[:-3:-1], x.dtype))
    try:
        restored = restore_params((path / "params").absolute(), target)
    except Exception as error:
        raise GreencodeError(f"{path / 'params'}: cannot restore parameters ({_first_line(error)})") from None
    if version == 1:
        restored = _swap_kernels(restored, lambda x: jax.numpy.swapaxes(x, -1, -2))
    nnx.replace_by_pure_dict(abstract_state, restored)
    model = nnx.merge(graphdef, abstract_state)
    model.origin = Origin(str(path))
    if scan_layers is not None:
        model.set_scan_layers(scan_layers)
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
