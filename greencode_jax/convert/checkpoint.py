"""Our own checkpoint: `greencode_config.json` (ModelConfig) + Orbax parameters + tokenizer files.

Layout of a checkpoint directory:
    greencode_config.json   {"format": "greencode-jax", "version": 2, "dtype": ..., "model": {...},
                             "fingerprint": the weights', "tokenizer_fingerprint": the tokenizer files' or null}
    params/                 Orbax StandardCheckpointer tree of the model's parameters
    tokenizer files         copied from the Hugging Face source, when it had them

Version 2 stores Linear kernels [out, in] (PyTorch's layout); version 1 stored them [in, out]
and is still read, its kernels transposed on restore.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from greencode_jax.atomic import atomic_directory
from greencode_jax.errors import GreencodeError
from greencode_jax.models import EarlyExitLM, ModelConfig, Origin, abstract_model, resolve_dtype
from greencode_jax.models.config import load_json

CONFIG_NAME = "greencode_config.json"
FINGERPRINT_KEY, TOKENIZER_KEY = "fingerprint", "tokenizer_fingerprint"  # convert/fingerprint.py
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


@contextlib.contextmanager
def _checkpointer():
    """An Orbax StandardCheckpointer, closed (its pending work finished) when the block ends."""
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    checkpointer = ocp.StandardCheckpointer()
    try:
        yield checkpointer
    finally:
        checkpointer.close()


def save_checkpoint(model: EarlyExitLM, out: str | Path, overwrite: bool = False, inputs: dict | None = None) -> Path:
    """Writes `model` as our checkpoint at `out`, atomically. An existing `out` is replaced (with
    `overwrite`) only when it is a checkpoint greencode-jax wrote and none of `inputs`."""
    out = Path(out)
    with atomic_directory(out, overwrite, kind="checkpoint", inputs=inputs) as tmp:
        # lazy: fingerprint imports checkpoint (a cycle at module top)
        from greencode_jax.convert.fingerprint import compute_model_fingerprint

        with _checkpointer() as checkpointer:
            checkpointer.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            checkpointer.wait_until_finished()
        copied = copy_tokenizer_files(model.origin.path, tmp)
        meta = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(model.dtype).name,
                "model": model.config.to_dict(), FINGERPRINT_KEY: compute_model_fingerprint(model),
                TOKENIZER_KEY: _source_tokenizer_fingerprint(model.origin.path) if copied else None}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _source_tokenizer_fingerprint(source_dir) -> str | None:
    """The fingerprint of the tokenizer files copied from `source_dir`; None when they form no
    tokenizer this machine can load (the corpus check then falls back to the vocabulary size)."""
    # lazy: fingerprint imports checkpoint (a cycle at module top)
    from greencode_jax.convert.fingerprint import model_tokenizer_fingerprint

    try:
        return model_tokenizer_fingerprint(source_dir)
    except GreencodeError:
        return None


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
    previous_hook = _quiet_abandoned_reads()
    try:
        with _checkpointer() as checkpointer:
            restored = checkpointer.restore(directory, target)
    except BaseException:
        _FAILED_DIRECTORIES.add(str(directory))
        raise
    # Succeeded: no read was abandoned. After a failure the filter stays, as abandoned reads report
    # themselves later (when they finish, or at interpreter exit).
    if previous_hook is not None and sys.unraisablehook is _quiet_hook:
        sys.unraisablehook = previous_hook
        _ASYNCIO_LOG.removeFilter(_quiet_asyncio_log)
    return restored


def _abandoned_read(unraisable) -> bool:
    """What Orbax's restore leaves behind when one array fails to read: it closes its event loop
    while the other arrays' reads are still in flight, so each of those later reports
    `RuntimeError: Event loop is closed` (TensorStore completing a future on the closed loop) or,
    when garbage-collected, an exception from its never-finished Orbax coroutine."""
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _quiet_hook(unraisable):
    if not _abandoned_read(unraisable):
        _outer_hook(unraisable)


def _quiet_asyncio_log(record: logging.LogRecord) -> bool:
    """The third way an abandoned read reports itself: a failed Orbax task, the future gathering
    several of them, or a bare TensorStore future reading the failed directory, garbage-collected
    with its exception unread, which asyncio logs ("Task exception was never retrieved",
    "Future exception was never retrieved"); only those naming Orbax or a directory whose restore
    failed are dropped."""
    message = record.getMessage()
    if "exception was never retrieved" not in message.splitlines()[0]:
        return True
    return not ("orbax" in message or any(directory in message for directory in _FAILED_DIRECTORIES))


_outer_hook = sys.__unraisablehook__
_FAILED_DIRECTORIES: set[str] = set()  # checkpoints whose restore failed: their reads may still report
_ASYNCIO_LOG = logging.getLogger("asyncio")


def _quiet_abandoned_reads():
    """Installs `_quiet_hook` as sys.unraisablehook and `_quiet_asyncio_log` on asyncio's logger
    (unless already installed); returns the hook it replaced, or None."""
    global _outer_hook
    _ASYNCIO_LOG.addFilter(_quiet_asyncio_log)  # a no-op when present; always, should someone have removed it
    if sys.unraisablehook is _quiet_hook:
        return None
    _outer_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_hook
    return _outer_hook


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
        trained = config.exit_layers
        config = config.replace(exit_layers=exit_layers)
        if config.exit_head and config.exit_layers != trained:
            raise GreencodeError(f"{path}: its exit heads are trained for exits {list(trained)}; other exit layers "
                                 f"({list(config.exit_layers)}) would leave heads without an exit or exits without "
                                 "a head")
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
        raise GreencodeError(f"{path}: checkpoint is corrupt or incomplete: its params/ cannot be restored "
                             f"({_root_cause(error)})") from None
    if version == 1:
        restored = _swap_kernels(restored, lambda x: jax.numpy.swapaxes(x, -1, -2))
    nnx.replace_by_pure_dict(abstract_state, restored)
    model = nnx.merge(graphdef, abstract_state)
    recorded = meta.get(FINGERPRINT_KEY)  # the weights as saved, whatever the dtype now
    model.origin = Origin(str(path), recorded if isinstance(recorded, str) else None)
    if scan_layers is not None:
        model.set_scan_layers(scan_layers)
    return model


def _root_cause(error: BaseException) -> str:
    """The innermost error's first sentence: Orbax wraps TensorStore's message ("Requested byte
    range [0, 1944) is not valid for value of size 50") in one that prints a whole TensorStore
    spec, bound-method repr included."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    sentence = re.split(r"(?<=[\w)\]])\. (?=[A-Z])", lines[0])[0]  # "... shape: (2, 16). Truncating/padding ..."
    sentence = re.sub(r"\s*\[tensorstore_spec.*$", "", sentence)  # a JSON dump of the spec
    sentence = re.sub(r'Error opening "\w+" driver: ', "", sentence)  # the layers of the spec, outermost first
    return sentence[:400]
