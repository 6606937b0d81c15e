"""Reading Hugging Face checkpoints one tensor at a time.

`TensorSource` lists the tensors of a model directory (single or sharded
safetensors, or `pytorch_model.bin` files) and reads them one by one, so an
import never holds a second full copy of the weights. Corrupt and truncated
files raise `GreencodeError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
import ml_dtypes
import numpy as np

from greencode_jax.errors import GreencodeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


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
    """The tensors of one checkpoint: names, shapes, and random-access reads one at a time."""

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
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._torch_cache: dict[Path, dict] = {}
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
    def read(self, name: str) -> np.ndarray:
        """One tensor, read from disk into a fresh array (never a memory map, so the
        file's pages do not accumulate in the process's memory)."""
        file = self.file_of(name)
        if self.format == "pytorch":
            return _torch_to_numpy(self._torch_state(file)[name])
        dtype, count, offset = self._location(file, name)
        with open(file, "rb") as f:
            f.seek(offset)
            array = np.fromfile(f, dtype=dtype, count=count)
        if array.size != count:
            raise GreencodeError(f"{file}: tensor '{name}' is cut short; the file is truncated")
        return array.reshape(self.shape(name))

    def _location(self, file: Path, name: str):
        if file not in self._headers:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[file] = (json.loads(f.read(size)), 8 + size)
        header, data_start = self._headers[file]
        info = header[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise GreencodeError(f"{file}: tensor '{name}' has dtype {info['dtype']}, which greencode-jax cannot read")
        begin, end = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        return dtype, (end - begin) // dtype.itemsize, data_start + begin

    def _open_safetensors(self, file: Path):
        from safetensors import safe_open

        try:  # the library validates the header and that the data covers every tensor
            return safe_open(str(file), framework="numpy")
        except Exception as error:
            raise GreencodeError(f"{file}: not a readable safetensors file ({error}); it is corrupt or truncated") from None

    def _torch_state(self, file: Path) -> dict:
        if file in self._torch_cache:
            return self._torch_cache[file]
        try:
            import torch
        except ImportError:
            raise GreencodeError(
                f"{file}: reading pytorch_model.bin needs torch (pip install torch==2.13.0), "
                "or convert the checkpoint to safetensors") from None
        try:  # mmap: tensors stay on disk until each one is converted
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            raise GreencodeError(f"{file}: not a readable PyTorch checkpoint ({error})") from None
        self._torch_cache = {file: state}  # keep one file mapped at a time
        return state


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
