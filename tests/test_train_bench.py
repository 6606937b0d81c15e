"""`greencode bench train` compares like with like: both of our layer layouts and the PyTorch step
start from the same weights and compute the same first loss on the same tokens."""

from __future__ import annotations

import pytest

from greencode_jax.cli.bench_forward import SHAPES
from greencode_jax.train.bench import run_bench_train


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-opt"])
def test_bench_sides_compute_the_same_loss(shape):
    family, fields = SHAPES[shape]
    r = run_bench_train(family, dict(fields), shape, batch=2, seq_len=32, exits=[0], repeats=1)
    losses = r["first_loss"]
    assert set(losses) == {"stacked", "per_layer", "torch"}
    for name in ("stacked", "per_layer"):
        assert losses[name] == pytest.approx(losses["torch"], rel=1e-5), name  # fp32, same weights and tokens
    assert r["exit_layers"] == [0, 1] and r["speed_ratio"] > 0
    assert r["jax_best_layout"] in ("stacked", "per_layer")
