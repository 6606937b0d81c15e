"""Weights in and out: Hugging Face directories, hub ids, and our own checkpoints."""

from __future__ import annotations

from pathlib import Path

from greencode_jax.convert.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from greencode_jax.convert.hf_export import export_pretrained
from greencode_jax.convert.hf_import import load_hf, resolve_model_dir
from greencode_jax.models import EarlyExitLM


def load_pretrained(path: str | Path, dtype="float32", exit_layers=None, scan_layers: bool | None = None
                    ) -> EarlyExitLM:
    """Loads a Hugging Face model directory or hub id, or a greencode-jax checkpoint.

    `dtype` is the parameter dtype ("float32", "bfloat16", "float16"); `exit_layers`
    (0-based decoder layers) overrides the exits stored with the model. `scan_layers`
    picks the layer layout: stacked for a scanned training forward (the default for a
    Hugging Face source), per-layer for decoding; a checkpoint keeps its own by default.
    """
    model_dir = resolve_model_dir(path)
    if is_checkpoint(model_dir):
        return load_checkpoint(model_dir, dtype, exit_layers, scan_layers)
    return load_hf(model_dir, dtype, exit_layers, True if scan_layers is None else scan_layers)


__all__ = ["export_pretrained", "load_checkpoint", "load_pretrained", "save_checkpoint"]
