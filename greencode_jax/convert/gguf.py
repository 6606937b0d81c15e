"""Llama GGUF files (llama.cpp's format) as Hugging Face model directories.

A GGUF file is read once through transformers' own GGUF loader (the `gguf` package
dequantises each tensor to float32 and transformers undoes llama.cpp's Q/K permutation),
and written as a Hugging Face directory (config.json, model.safetensors, tokenizer files)
in a cache keyed by the file's path, size and modification time. Every later reader (the
streaming import, `prepare-data --tokenizer`, fine-tuning) then reads that directory like
any other: one code path after the conversion.

The cache lives in $GREENCODE_CACHE_DIR, else ~/.cache/greencode-jax, under gguf/.
Reading needs the optional extra: torch, gguf and accelerate (`scripts/setup --real-model`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from greencode_jax.atomic import atomic_directory
from greencode_jax.convert.hf_export import quiet_transformers
from greencode_jax.errors import GreencodeError

SUPPORTED_ARCHITECTURES = ("llama",)  # what greencode-jax's models run; OPT has no GGUF form in transformers
MARKER = "greencode_gguf.json"  # written last into a finished conversion
EXTRA_HINT = "pip install torch==2.13.0 gguf==0.19.0 accelerate==1.15.0 (or scripts/setup --real-model)"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() == ".gguf"


def cache_root() -> Path:
    return Path(os.environ.get("GREENCODE_CACHE_DIR") or Path.home() / ".cache" / "greencode-jax")


def _key(path: Path) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def gguf_model_dir(path: str | Path, progress: bool = True) -> Path:
    """The Hugging Face directory of a GGUF file, converting it on first use."""
    path = Path(path)
    out = cache_root() / "gguf" / _key(path)
    if (out / MARKER).exists():
        return out
    check_gguf(path)
    if progress:
        print(f"reading {path} through transformers' GGUF loader (once; cached at {out})", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out, overwrite=True) as tmp:
        _convert(path, tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(path.resolve())}) + "\n")
    return out


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise GreencodeError(f"{path}: reading a GGUF file needs the gguf package: {EXTRA_HINT}") from None
    try:
        return gguf, gguf.GGUFReader(str(path))
    except Exception as error:  # the reader validates magic, version and that every tensor fits in the file
        raise GreencodeError(f"{path}: not a readable GGUF file ({str(error).splitlines()[0][:200]}); "
                             "it is corrupt or truncated") from None


def check_gguf(path: Path):
    """Refuses, naming what is wrong, a GGUF file this project cannot run: another architecture,
    or a tensor type that the gguf package cannot dequantise."""
    gguf, reader = _reader(path)
    field = reader.fields.get("general.architecture")
    architecture = None if field is None else field.contents()
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GreencodeError(f"{path}: GGUF architecture {architecture!r} is not supported; greencode-jax reads "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files")
    checked = set()
    for tensor in reader.tensors:
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        if qtype in checked:
            continue
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        try:  # one block through the dequantiser the loader uses
            gguf.dequantize(tensor.data.reshape(-1).view(np.uint8)[:block_bytes], qtype)
        except NotImplementedError:
            raise GreencodeError(f"{path}: tensor '{tensor.name}' is quantised as {qtype.name}, which the gguf "
                                 "package cannot dequantise; use a GGUF file in F32, F16, BF16, Q8_0, Q4_0/1, "
                                 "Q5_0/1 or a K-quant") from None
        checked.add(qtype)


def _convert(path: Path, out: Path):
    try:
        import torch  # noqa: F401 (transformers' GGUF loader needs it)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise GreencodeError(f"{path}: reading a GGUF file needs torch and transformers ({error}): {EXTRA_HINT}") from None
    folder, name = str(path.parent), path.name
    with quiet_transformers():  # our own line says what is happening; the dequantising bar stays
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except ImportError as error:
            raise GreencodeError(f"{path}: {error}: {EXTRA_HINT}") from None
        except Exception as error:
            raise GreencodeError(f"{path}: transformers could not load this GGUF file "
                                 f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        _write_weights(model, config, out)
        del model
        try:
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(out))
        except Exception as error:
            raise GreencodeError(f"{path}: transformers could not read the GGUF file's tokenizer "
                                 f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None


def _write_weights(model, config, out: Path):
    """config.json without the quantisation record, and the float32 state dict as safetensors."""
    from safetensors.torch import save_file

    fields = config.to_dict()
    fields.pop("quantization_config", None)  # float32 weights: nothing quantised is left
    fields["architectures"] = [type(model).__name__]
    fields["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the tied head is the embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
