"""Training on real code (the standard library corpus): the loss falls, every exit is scored,
and the run's outputs are complete and loadable."""

from __future__ import annotations

import json

import numpy as np
import yaml

import greencode_jax as gc
from greencode_jax.metrics_log import read_metrics
from test_train_support import (  # noqa: F401 (fixtures)
    FINISHED_STEPS, compile_cache, finished_tiny_run, stdlib_corpus,
)


def test_loss_falls_on_the_stdlib_corpus(finished_tiny_run):
    records = [r for r in read_metrics(finished_tiny_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, FINISHED_STEPS + 1))
    first, last = records[0], records[-1]
    # a 512-token vocabulary starts near ln(512) = 6.24 nats; 80 steps of 256 tokens at lr 3e-3 learn the
    # frequent tokens of code (spaces, <EOL>, brackets), which takes well over a nat off every exit
    assert abs(first["loss"] - np.log(512)) < 0.1
    for layer in ("0", "1"):
        assert last["exit_loss"][layer] < first["exit_loss"][layer] - 1.0, layer
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 1.0
    assert all(np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in records)


def test_run_outputs_are_complete(finished_tiny_run, tmp_path):
    config = yaml.safe_load((finished_tiny_run / "config.yaml").read_text())
    assert config["train"]["steps"] == FINISHED_STEPS and config["model"]["exit_layers"] == [0]
    evaluation = json.loads((finished_tiny_run / "eval.json").read_text())
    assert evaluation["split"] == "test" and set(evaluation["exit_accuracy"]) == {"0", "1"}
    assert evaluation["tokens"] == 4 * 8 * 31
    assert 0 < evaluation["unigram_accuracy"] < 1
    model = gc.load_pretrained(finished_tiny_run / "final")  # the final checkpoint loads as a model
    assert model.config.exit_layers == (0, 1) and not model.config.remat
    assert (finished_tiny_run / "final" / "tokenizer.json").exists()  # the corpus's tokenizer travels with it
    logits = np.asarray(model.logits(np.arange(1, 9)[None], layer=0))
    assert logits.shape == (1, 8, model.config.vocab_size) and np.isfinite(logits).all()

    # ...and exports to a Hugging Face directory that transformers loads without missing or unexpected keys
    import torch
    import transformers

    gc.export_pretrained(model, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        final = hf(torch.arange(1, 9)[None]).logits.numpy()
    np.testing.assert_allclose(final, np.asarray(model.logits(np.arange(1, 9)[None])), atol=1e-4)
