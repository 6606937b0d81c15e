"""Learned.save / Learned.load: what train-policy writes is what generation decides with."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import greencode_jax as gc
from greencode_jax.models import ModelConfig, init_model

HIDDEN = 16


def _policy(exit_layers=(0, 1, 2)):
    params = gc.policies.Learned.init_params(jax.random.key(3), HIDDEN, widths=(8, 8))
    params["obs_mean"] = jnp.linspace(-1, 1, HIDDEN)
    params["obs_std"] = jnp.linspace(0.5, 2, HIDDEN)
    return gc.policies.Learned(params, 0.5, exit_layers=exit_layers)


def test_save_then_load_gives_the_same_exit_probabilities(tmp_path):
    policy = _policy()
    policy.save(tmp_path / "nested" / "policy", metadata={"reward": "greencode"})
    loaded = gc.policies.Learned.load(tmp_path / "nested" / "policy", threshold=0.7)
    hidden = jax.random.normal(jax.random.key(1), (5, HIDDEN))
    # The same program on the same float32 numbers: bit-identical.
    np.testing.assert_array_equal(policy.exit_probability(hidden), loaded.exit_probability(hidden))
    assert float(loaded.threshold) == 0.7 and loaded.exit_layers == (0, 1, 2)
    info = json.loads((tmp_path / "nested" / "policy" / "policy.json").read_text())
    assert info["reward"] == "greencode" and info["hidden_size"] == HIDDEN
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["policy"]  # nothing else left


def _model(exit_layers):
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=50, hidden_size=HIDDEN, intermediate_size=32,
                                      num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=128), exit_layers=exit_layers)
    return init_model(config)


def test_generation_refuses_a_policy_trained_on_other_exits(tmp_path):
    _policy(exit_layers=(0, 1, 2, 3)).save(tmp_path / "p")
    policy = gc.policies.Learned.load(tmp_path / "p")
    with pytest.raises(gc.GreencodeError, match=r"trained on exit layers \[0, 1, 2, 3\].*exits at \[1, 3\]"):
        _model([1]).generate(np.array([[5, 6, 7]]), max_new_tokens=2, policy=policy)


def test_generation_refuses_a_policy_of_another_hidden_size():
    params = gc.policies.Learned.init_params(jax.random.key(0), HIDDEN + 1)
    with pytest.raises(gc.GreencodeError, match="hidden size is 16"):
        _model([1]).generate(np.array([[5, 6, 7]]), max_new_tokens=2, policy=gc.policies.Learned(params))


def test_load_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(gc.GreencodeError, match="no such policy directory"):
        gc.policies.Learned.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gc.GreencodeError, match="policy.json is missing"):
        gc.policies.Learned.load(tmp_path / "empty")
    _policy().save(tmp_path / "p")
    weights = tmp_path / "p" / "actor.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(gc.GreencodeError, match="unreadable policy weights"):
        gc.policies.Learned.load(tmp_path / "p")
    (tmp_path / "p" / "policy.json").write_text('{"format": "other"}')
    with pytest.raises(gc.GreencodeError, match="not a greencode policy"):
        gc.policies.Learned.load(tmp_path / "p")
