"""Bad input to generate(): a GreencodeError naming what is wrong, before anything compiles."""

from __future__ import annotations

import numpy as np
import pytest

import greencode_jax as gc
from generate_helpers import gen_models, llama, rows_of  # noqa: F401 (fixtures)
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.decode import generate_jit

P = gc.policies


@pytest.fixture(autouse=True)
def nothing_compiles():
    before = generate_jit._cache_size()
    yield
    assert generate_jit._cache_size() == before, "an invalid call reached the jitted generation"


@pytest.fixture(scope="module")
def model(llama):
    return llama.ours


@pytest.fixture(scope="module")
def prompt(llama):
    return rows_of(llama, [12])[0][None]


def test_prompt_plus_new_tokens_beyond_the_positions(model, llama):
    limit = model.config.max_position_embeddings
    assert limit == 640
    ids = np.resize(llama.ids[0], (1, limit - 14))  # 626 + 15 = 641
    with pytest.raises(GreencodeError, match=r"prompt of 626 tokens \+ max_new_tokens=15 exceeds .*"
                                             r"max_position_embeddings=640"):
        model.generate(ids, max_new_tokens=15)
    with pytest.raises(GreencodeError, match="max_position_embeddings=640"):
        model.generate(np.resize(llama.ids[0], (1, limit + 5)), max_new_tokens=1)
    # padding does not count, real tokens do: a left-padded row of 626 real tokens is too long too
    mask = np.ones((2, limit - 14), np.int64)
    mask[1, :100] = 0
    with pytest.raises(GreencodeError, match="prompt of 626 tokens"):
        model.generate(np.resize(llama.ids, (2, limit - 14)), mask, max_new_tokens=15)


def test_exit_layer_not_among_the_models_exit_layers(llama, prompt):
    model = gc.load_pretrained(llama.path, exit_layers=[1], scan_layers=False)
    assert model.config.exit_layers == (1, 3)
    with pytest.raises(GreencodeError, match=r"FixedExit\(2\): layer 2 is not one of the model's exit layers \[1, 3\]"):
        model.generate(prompt, policy=P.FixedExit(2))
    with pytest.raises(GreencodeError, match=r"FixedExit\(7\)"):
        llama.ours.generate(prompt, policy=P.FixedExit(7))


@pytest.mark.parametrize("ids,mask", [
    ([], None),
    ([[]], None),
    (np.zeros((2, 0), np.int32), None),
    ([[5, 6, 7], [8, 9, 10]], [[1, 1, 1], [0, 0, 0]]),  # a row with no real token
], ids=["empty-list", "empty-row", "zero-length", "all-padding-row"])
def test_empty_prompt(model, ids, mask):
    with pytest.raises(GreencodeError, match="empty"):
        model.generate(ids, mask)


def test_unequal_lengths_without_a_mask(model):
    with pytest.raises(GreencodeError, match="unequal lengths; left-pad them to one length and pass attention_mask"):
        model.generate([[5, 6, 7], [8, 9]])
    with pytest.raises(GreencodeError, match="unequal lengths"):  # a mask cannot describe ragged rows either
        model.generate([[5, 6, 7], [8, 9]], [[1, 1, 1], [1, 1]])


def test_right_padding(model):
    with pytest.raises(GreencodeError, match="padding must be on the left"):
        model.generate([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]])
    with pytest.raises(GreencodeError, match="padding must be on the left"):
        model.generate([[5, 0, 7]], [[1, 0, 1]])  # a hole


def test_sampling_without_a_key(model, prompt):
    with pytest.raises(GreencodeError, match="sampling needs a PRNG key"):
        model.generate(prompt, sampling=gc.Sampling(temperature=0.7))


def test_bad_strategy(model, prompt):
    with pytest.raises(GreencodeError, match=r"strategy 'fast': expected one of \('skip', 'masked'\)"):
        model.generate(prompt, strategy="fast")


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0: expected a positive integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(policy="greedy"), "policy 'greedy': expected one of"),
    (dict(policy=P.Confidence(0.5, min_layer=4)), "min_layer=4: expected 0..3"),
    (dict(policy=P.FixedExit(1, min_layer=-1)), "min_layer=-1"),
    (dict(policy=P.Learned(None, 0.5)), "Learned policy has no params"),
    (dict(policy=P.Learned({"layers": []}, 0.5)), "Learned policy params: expected a dict of obs_mean"),
    (dict(policy=P.Learned({"obs_mean": 0, "obs_std": 1, "layers": [{"w": np.zeros((64, 8))}]}, 0.5)),
     r"layer 0 has w, b shapes \(\(64, 8\), \(\)\)"),
    (dict(policy=P.Learned({"obs_mean": np.zeros(64), "obs_std": np.ones(64),
                            "layers": [{"w": np.zeros((64, 3)), "b": np.zeros(3)}]}, 0.5)),
     "expected 2 outputs .* got 3 outputs"),
    (dict(policy=P.Learned({"obs_mean": np.zeros(32), "obs_std": np.ones(64),
                            "layers": [{"w": np.zeros((64, 2)), "b": np.zeros(2)}]}, 0.5)),
     r"obs_mean, obs_std of shape \[64\]; got 2 outputs, \(32,\), \(64,\)"),
])
def test_bad_arguments(model, prompt, kwargs, match):
    with pytest.raises(GreencodeError, match=match):
        model.generate(prompt, **kwargs)


def test_bad_token_ids_and_masks(model):
    with pytest.raises(GreencodeError, match="expected integer token ids"):
        model.generate(np.ones((1, 4), np.float32))
    with pytest.raises(GreencodeError, match="expected integer token ids"):
        model.generate(np.ones((1, 2, 3), np.int32))
    with pytest.raises(GreencodeError, match=r"attention_mask: shape \[1, 3\] differs from input_ids \[1, 4\]"):
        model.generate([[5, 6, 7, 8]], [[1, 1, 1]])


def test_bad_policy_and_sampling_options():
    with pytest.raises(GreencodeError, match="Confidence measure 'entropy'"):
        P.Confidence(0.5, measure="entropy")
    with pytest.raises(GreencodeError, match="temperature"):
        gc.Sampling(temperature=-1.0)
    with pytest.raises(GreencodeError, match="top_k"):
        gc.Sampling(top_k=-1)
    for top_p in (0.0, 1.5):
        with pytest.raises(GreencodeError, match="top_p"):
            gc.Sampling(top_p=top_p)


def test_public_names_resolve_whatever_was_imported_first(model, prompt):
    """`gc.policies` / `gc.Sampling` load lazily; `gc.generate` is the subpackage (its function is
    `greencode_jax.generate.generate`, the same as `model.generate`), so importing one of its
    modules first changes nothing."""
    import importlib

    importlib.import_module("greencode_jax.generate.decode")
    assert gc.policies.Full is importlib.import_module("greencode_jax.generate.policies").Full
    assert gc.Sampling is importlib.import_module("greencode_jax.generate.sampling").Sampling
    with pytest.raises(GreencodeError, match="strategy"):
        gc.generate.generate(model, prompt, strategy="x")
    with pytest.raises(GreencodeError, match="strategy"):
        model.generate(prompt, strategy="x")
