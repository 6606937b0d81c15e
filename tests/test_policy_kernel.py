"""The Learned policy's fused Pallas kernel (generate.policy_kernel) against the MLP by hand.

On this CPU the kernel runs in Pallas' interpret mode, which executes the kernel body as
written (its chunked first layer, the logit-difference sigmoid); the GPU build is checked by
lowering for CUDA from here, which runs Pallas' Triton lowering and its shape rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import greencode_jax as gc
from generate_helpers import gen_models, learned_exit_probability, llama, rows_of  # noqa: F401 (fixtures)
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.policy_kernel import chunk_size, fused_exit_probability

P = gc.policies


def random_params(hidden_size, widths, seed=0):
    """Actor params with every number non-trivial: normalisation, biases, spread logits."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    params = P.Learned.init_params(next(keys), hidden_size, widths)
    params["obs_mean"] = jax.random.normal(next(keys), (hidden_size,))
    params["obs_std"] = jnp.exp(0.5 * jax.random.normal(next(keys), (hidden_size,)))
    for layer in params["layers"]:
        layer["b"] = 0.3 * jax.random.normal(next(keys), layer["b"].shape)
    params["layers"][-1]["w"] = 3 * params["layers"][-1]["w"]
    return params


@pytest.mark.parametrize("hidden_size,widths,chunks", [
    (64, (64, 64), 1),  # GREEN-CODE's [64, 64]
    (96, (16,), 3),  # chunks of 32; 4 slots, one of them zeros
    (40, (32, 8, 4), 5),  # chunks of 8, three hidden layers; 8 slots
    (2560, (64, 64), 20),  # OPT-2.7B's width, chunks of 128; 32 slots
])
def test_fused_kernel_equals_the_mlp_by_hand(hidden_size, widths, chunks):
    assert hidden_size // chunk_size(hidden_size, widths[0]) == chunks
    params = random_params(hidden_size, widths)
    hidden = 2 * jax.random.normal(jax.random.key(7), (3, hidden_size))
    want = np.array([learned_exit_probability(params, row) for row in np.asarray(hidden)])
    assert np.ptp(want) > 0.1, want  # rows that differ: a kernel reading one row for all would fail
    got = np.asarray(fused_exit_probability(params, hidden))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the XLA path agrees too, and any leading shape is kept
    xla = np.asarray(P.Learned(params).exit_probability(hidden))
    np.testing.assert_allclose(got, xla, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fused_exit_probability(params, hidden[0])), want[0], rtol=0, atol=1e-5)
    stacked = np.asarray(fused_exit_probability(params, jnp.stack([hidden, hidden[::-1]])))
    np.testing.assert_allclose(stacked, np.stack([want, want[::-1]]), rtol=0, atol=1e-5)


def test_fused_kernel_reads_bfloat16_states_as_the_xla_path_does():
    params = random_params(128, (64, 64), seed=1)
    hidden = jax.random.normal(jax.random.key(2), (2, 128)).astype(jnp.bfloat16)
    want = np.array([learned_exit_probability(params, row) for row in np.asarray(hidden, np.float32)])
    np.testing.assert_allclose(np.asarray(fused_exit_probability(params, hidden)), want, rtol=0, atol=1e-5)


def test_xla_path_multiplies_in_full_float32_on_every_platform():
    """On a GPU XLA's default float32 dot rounds its operands to TF32, and the two paths then
    disagree by ~1e-4 in P(exit) (seen on an H100): the XLA path asks for HIGHEST precision.
    The request is in the lowered program, whatever platform it is lowered for."""
    import re

    params = random_params(128, (64, 64))
    lowered = jax.jit(P.Learned(params).exit_probability).trace(jnp.ones((1, 128))).lower(
        lowering_platforms=("cuda",)).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", lowered)
    assert len(dots) == 3, dots
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots


def test_fused_kernel_lowers_to_two_triton_kernels_for_a_gpu():
    """Lowered for CUDA (from this CPU host) the MLP is two Triton custom calls (the first
    layer over a grid of chunks, then the rest) and nothing interpreted; lowered for the CPU,
    the interpreter's plain HLO and no Triton call."""
    params = random_params(3072, (64, 64))  # Llama-3.2-3B's width
    hidden = jnp.ones((4, 3072), jnp.bfloat16)
    cuda = jax.jit(fused_exit_probability).trace(params, hidden).lower(lowering_platforms=("cuda",)).as_text()
    cpu = jax.jit(fused_exit_probability).trace(params, hidden).lower(lowering_platforms=("cpu",)).as_text()
    assert cuda.count("__gpu$xla.gpu.triton") == 2
    assert "stablehlo.dot" not in cuda and "stablehlo.while" not in cuda and "stablehlo.reduce" not in cuda
    assert "grid_x = 4 : i32, grid_y = 32 : i32" in cuda  # 4 rows x 24 chunks of 128, padded to 32 slots
    assert "triton" not in cpu


def test_platform_choice_leaves_no_conditional_in_the_compiled_program():
    """The kernels are picked per platform with a `case` on a constant platform index; XLA must
    fold it away, since on a GPU a run-time conditional would cost a launch per
    decision. (XLA's conditional simplifier does this on every backend; checked on this one.)"""
    import re

    params = random_params(256, (64, 64))
    hidden = jnp.ones((1, 256), jnp.float32)
    lowered = jax.jit(fused_exit_probability).lower(params, hidden)
    assert "stablehlo.case" in lowered.as_text()  # the platform switch is there before compiling...
    assert not re.search(r"\bconditional\(", lowered.compile().as_text())  # ...and gone after


def test_decode_step_calls_the_kernels_once_per_decision(llama):
    """Generation lowered for CUDA: the two Triton kernels once per exit decision (3 on the
    4-layer test model), so each decision is two launches for the policy."""
    from greencode_jax.generate.decode import generate_jit

    policy = jax.tree.map(jnp.asarray, P.Learned(random_params(llama.config.hidden_size, (64, 64)), 0.5,
                                                 kernel="pallas"))
    lowered = generate_jit.trace(llama.ours, jnp.zeros((1, 64), jnp.int32), jnp.ones((1, 64), bool), policy,
                                 jnp.asarray([-1], jnp.int32), jnp.int32(0), jax.random.key(0), jnp.int32(4),
                                 sampling=gc.Sampling(), token_slots=16, cache_len=80, skip=True)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert llama.config.exit_layers == (0, 1, 2, 3)
    assert text.count("__gpu$xla.gpu.triton") == 2 * 3


def test_unsupported_params_and_kernels_get_one_clear_error(llama, monkeypatch):
    prompt = rows_of(llama, [12])[0][None]
    hidden = llama.config.hidden_size
    with pytest.raises(GreencodeError, match=r"hidden widths \[48, 64\] are not all powers of two.*kernel='xla'"):
        llama.ours.generate(prompt, policy=P.Learned(random_params(hidden, (48, 64)), 0.5, kernel="pallas"))
    with pytest.raises(GreencodeError, match="Learned kernel 'triton': expected one of"):
        P.Learned(random_params(hidden, (64,)), 0.5, kernel="triton")
    with pytest.raises(GreencodeError, match=rf"layer 0 has w, b shapes \(\(32, 64\), \(64,\)\), expected w \[{hidden}, n\]"):
        llama.ours.generate(prompt, policy=P.Learned(random_params(32, (64,)), 0.5))
    # on a TPU (JAX's backend faked: this machine has none) the Triton kernels are refused by name
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(GreencodeError, match="written for GPUs.*on a TPU.*kernel='xla'"):
        llama.ours.generate(prompt, policy=P.Learned(random_params(hidden, (64,)), 0.5, kernel="pallas"))
    monkeypatch.undo()
    # the XLA path takes any widths: the same params run there
    llama.ours.generate(prompt, max_new_tokens=2, policy=P.Learned(random_params(hidden, (48, 64)), 0.5))
