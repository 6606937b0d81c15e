"""`greencode bench train` compares like with like: both of our layer layouts and the PyTorch step
start from the same weights and compute the same first loss on the same tokens."""

from __future__ import annotations

import pytest

from greencode_jax.bench.train import run_bench_train
from greencode_jax.bench.zoo import SHAPES


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


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-opt"])
def test_bf16_bench_computes_both_sides_in_bf16(shape):
    family, fields = SHAPES[shape]
    run = lambda dtype: run_bench_train(family, dict(fields), shape, batch=2, seq_len=32, exits=[0], repeats=1,  # noqa
                                        dtype=dtype, layouts=("stacked",))["first_loss"]
    fp32, bf16 = run("float32"), run("bfloat16")
    for side in ("stacked", "torch"):
        # bf16 compute (ours, PyTorch's autocast) moves the loss off the fp32 value, by bf16 rounding only
        assert bf16[side] != fp32[side], side
        assert bf16[side] == pytest.approx(fp32[side], rel=1e-4), side


def test_train_flops_count_matches_a_hand_count_of_tiny_llama():
    import tempfile

    import torch
    import transformers

    import greencode_jax as gc
    from greencode_jax.bench.train import peak_flops, train_flops_per_token

    family, fields = SHAPES["tiny-llama"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**fields)).save_pretrained(tmp)
        model = gc.load_pretrained(tmp, exit_layers=[0, 1])
    d, ffn, heads, kv_heads, vocab, layers, seq = 64, 128, 4, 2, 512, 2, 32
    head_dim = d // heads
    per_layer = d * d + 2 * d * kv_heads * head_dim + d * d + 3 * d * ffn  # q, k, v, o, gate, up, down
    attention = layers * 4 * d * (seq + 1) / 2  # scores and values, mean causal context
    forward = 2 * layers * per_layer + 2 * d * vocab * 2 + attention  # untied head, two exits
    assert train_flops_per_token(model, [0, 1], seq) == 3 * forward
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_flops("cpu") is None
