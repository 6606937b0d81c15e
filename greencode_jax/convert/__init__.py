"""Weights in and out: Hugging Face directories, hub ids, and our own checkpoints."""

from __future__ import annotations

from pathlib import Path

from greencode_jax.convert.checkpoint import CONFIG_NAME, is_checkpoint, load_checkpoint, save_checkpoint
from greencode_jax.convert.exit_heads import attach_exit_heads
from greencode_jax.convert.hf_export import export_pretrained
from greencode_jax.convert.hf_import import load_hf, resolve_model_dir
from greencode_jax.errors import GreencodeError
from greencode_jax.models import EarlyExitLM, ModelConfig
from greencode_jax.models.config import load_json


def load_pretrained(path: str | Path, dtype="float32", exit_layers=None, scan_layers: bool | None = None,
                    exit_heads: bool | str | Path | None = None) -> EarlyExitLM:
    """Loads a Hugging Face model directory or hub id, or a greencode-jax checkpoint.

    `dtype` is the parameter dtype ("float32", "bfloat16", "float16"); `exit_layers`
    (0-based decoder layers) overrides the exits stored with the model. `scan_layers`
    picks the layer layout: stacked for a scanned training forward (the default for a
    Hugging Face source), per-layer for decoding; a checkpoint keeps its own by default.
    `exit_heads`: None takes the model as it is (with the exit heads its checkpoint or its
    `exit_heads.safetensors` hold, if any); True requires exit heads; a path attaches the heads
    of that `exit_heads.safetensors` file.
    """
    model_dir = resolve_model_dir(path)
    if is_checkpoint(model_dir):
        model = load_checkpoint(model_dir, dtype, exit_layers, scan_layers)
    else:
        model = load_hf(model_dir, dtype, exit_layers, True if scan_layers is None else scan_layers)
    if exit_heads is True and model.exit_heads is None:
        raise GreencodeError(f"{path}: has no exit heads (a full fine-tune's exits, or none trained); train heads "
                             "with train.method=heads, or attach a file: exit_heads=PATH")
    if isinstance(exit_heads, (str, Path)):
        if not Path(exit_heads).is_file():
            raise GreencodeError(f"{exit_heads}: no such exit heads file")
        attach_exit_heads(model, Path(exit_heads), requested_exits=exit_layers)
    return model


def load_model_config(path: str | Path, exit_layers=None) -> ModelConfig:
    """The architecture of a model directory or checkpoint, read without its weights (to check
    a command's arguments before the model loads)."""
    model_dir = resolve_model_dir(path)
    if is_checkpoint(model_dir):
        meta = load_json(model_dir / CONFIG_NAME, "greencode checkpoint config")
        if not isinstance(meta.get("model"), dict):
            raise GreencodeError(f"{model_dir / CONFIG_NAME}: not a greencode-jax checkpoint config")
        config = ModelConfig.from_dict(meta["model"], source=str(model_dir / CONFIG_NAME))
        return config if exit_layers is None else config.replace(exit_layers=exit_layers)
    return ModelConfig.from_hf(load_json(model_dir / "config.json", "Hugging Face config"), exit_layers=exit_layers,
                               source=str(model_dir / "config.json"))


__all__ = ["export_pretrained", "load_checkpoint", "load_model_config", "load_pretrained", "save_checkpoint"]
