"""Reading Hugging Face checkpoints one tensor at a time.

`TensorSource` lists the tensors of a model directory (single or sharded
safetensors, or `pytorch_model.bin` files) and reads them one by one, so an
import never holds a second full copy of the weights. Corrupt and truncated
files raise `GreencodeError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from greencode_jax.errors import GreencodeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"


def _weight_files(model_dir: Path, index_name: str, single_name: str) -> list[Path] | None:
    index = model_dir / index_name
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise GreencodeError(f"{index}: malformed shard index ({error!r}); expected a 'weight_map' object") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise GreencodeError(f"{index}: names shard {missing[0]}, which does not exist")
        return files
    single = model_dir / single_name
    return [single] if single.exists() else None


class TensorSource:
    """The tensors of one checkpoint: names, shapes, and reads one at a time."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        files = _weight_files(self.dir, SAFETENSORS_INDEX, SAFETENSORS_SINGLE)
        self.format = "safetensors"
        if files is None:
            files = _weight_files(self.dir, TORCH_INDEX, TORCH_SINGLE)
            self.format = "pytorch"
        if files is None:
            raise GreencodeError(
                f"{self.dir}: no weights found; expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                f"{TORCH_SINGLE} or {TORCH_INDEX}")
        self.files = files
        self._shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
        for file in files:
            for name, shape in self._list(file):
                self._shapes[name] = (shape, file)

    # ---- listing ----------------------------------------------------------------
    def _list(self, file: Path):
        if self.format == "safetensors":
            with self._open_safetensors(file) as f:
                return [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
        return [(name, tuple(t.shape)) for name, t in self._torch_state(file).items()]

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name][0]

    def file_of(self, name: str) -> Path:
        return self._shapes[name][1]

    # ---- reading ----------------------------------------------------------------
    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, array) file by file; only one tensor is materialised at a time."""
        for file in self.files:
            if self.format == "safetensors":
                with self._open_safetensors(file) as f:
                    for name in f.keys():
                        yield name, self._read(file, f.get_tensor, name)
            else:
                state = self._torch_state(file)
                for name in list(state):
                    yield name, _torch_to_numpy(state.pop(name))

    def _read(self, file, getter, name):
        try:
            return getter(name)
        except Exception as error:  # the rust reader raises SafetensorError or OSError
            raise GreencodeError(f"{file}: cannot read tensor '{name}' ({error}); the file is corrupt or truncated") from None

    def _open_safetensors(self, file: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(file), framework="numpy")
        except Exception as error:
            raise GreencodeError(f"{file}: not a readable safetensors file ({error}); it is corrupt or truncated") from None

    def _torch_state(self, file: Path) -> dict:
        try:
            import torch
        except ImportError:
            raise GreencodeError(
                f"{file}: reading pytorch_model.bin needs torch (pip install torch==2.13.0), "
                "or convert the checkpoint to safetensors") from None
        try:  # mmap: tensors stay on disk until each one is converted
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            raise GreencodeError(f"{file}: not a readable PyTorch checkpoint ({error})") from None


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
