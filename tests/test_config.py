"""ModelConfig <-> transformers configs, exit-layer validation, and RoPE inverse frequencies."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import greencode_jax as gc
from conftest import LLAMA3_ROPE, VARIANTS, hf_config
from greencode_jax.models.layers import rope_inv_freq

# Configs beyond the test models: the other OPT/Llama options we read. (to_hf() writes OPT's
# dropout as 0.0, an inference export; the direct configs say so too so the dicts compare equal.)
OPT_NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0)
EXTRA_HF_CONFIGS = {
    "opt_no_final_norm": lambda: transformers.OPTConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=48,
        max_position_embeddings=64, _remove_final_layer_norm=True, activation_function="gelu", **OPT_NO_DROPOUT),
    "opt_no_affine": lambda: transformers.OPTConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=48,
        max_position_embeddings=64, layer_norm_elementwise_affine=False, activation_function="gelu_new", **OPT_NO_DROPOUT),
    # opt-350m-like config whose (unused) _remove_final_layer_norm is set: still a field we read
    "opt_post_ln_removed_norm": lambda: transformers.OPTConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=48,
        max_position_embeddings=64, do_layer_norm_before=False, word_embed_proj_dim=16,
        _remove_final_layer_norm=True, **OPT_NO_DROPOUT),
    "llama_linear_rope": lambda: transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, eos_token_id=[2, 3],
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}),
}
ALL_CONFIGS = {**{name: (lambda name=name: hf_config(name)) for name in VARIANTS}, **EXTRA_HF_CONFIGS}


def read_fields(hf) -> dict:
    """What each HF field we read should become, computed independently from the HF config object."""
    d = hf.to_dict()
    common = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                  num_heads=d["num_attention_heads"], max_position_embeddings=d["max_position_embeddings"],
                  tie_word_embeddings=d["tie_word_embeddings"], bos_token_id=d["bos_token_id"],
                  pad_token_id=d["pad_token_id"],
                  eos_token_id=tuple(d["eos_token_id"]) if isinstance(d["eos_token_id"], list) else d["eos_token_id"])
    if d["model_type"] == "opt":
        return dict(common, family="opt", num_kv_heads=d["num_attention_heads"],
                    head_dim=d["hidden_size"] // d["num_attention_heads"], intermediate_size=d["ffn_dim"],
                    activation=d["activation_function"], attention_bias=d["enable_bias"], mlp_bias=d["enable_bias"],
                    pre_layer_norm=d["do_layer_norm_before"], final_layer_norm=not d["_remove_final_layer_norm"],
                    layer_norm_affine=d["layer_norm_elementwise_affine"], embed_dim=d["word_embed_proj_dim"],
                    norm_eps=1e-5)
    rope = d["rope_parameters"]
    scaling = gc.models.RopeScaling(
        rope["rope_type"], **{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings") if k in rope})
    return dict(common, family="llama", num_kv_heads=d["num_key_value_heads"], head_dim=d["head_dim"],
                intermediate_size=d["intermediate_size"], activation=d["hidden_act"], norm_eps=d["rms_norm_eps"],
                attention_bias=d["attention_bias"], mlp_bias=d["mlp_bias"], rope_theta=rope["rope_theta"],
                rope_scaling=scaling)


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_from_hf_reads_every_field(name):
    hf = ALL_CONFIGS[name]()
    config = gc.ModelConfig.from_hf(hf)
    for field, want in read_fields(hf).items():
        assert getattr(config, field) == want, field
    # the same from the config.json dict a model directory holds
    assert gc.ModelConfig.from_hf(json.loads(hf.to_json_string())) == config


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_to_hf_round_trip(name):
    hf = ALL_CONFIGS[name]()
    config = gc.ModelConfig.from_hf(hf)
    back = config.to_hf()
    assert type(back) is type(hf)
    assert gc.ModelConfig.from_hf(back) == config
    assert gc.ModelConfig.from_hf(json.loads(back.to_json_string())) == config
    # our to_hf() is the config transformers builds directly, apart from what we add
    ours, direct = back.to_dict(), hf.to_dict()
    assert ours.pop("greencode_exit_layers") == list(range(config.num_layers))
    assert ours.pop("architectures") == [f"{type(hf).__name__[:-6]}ForCausalLM"]
    direct.pop("architectures")
    assert ours == direct
    # and PyTorch builds the same parameters from it
    shapes = lambda c: {k: tuple(v.shape) for k, v in transformers.AutoModelForCausalLM.from_config(c).state_dict().items()}
    assert shapes(back) == shapes(hf)


def test_our_dict_round_trip():
    for name in ALL_CONFIGS:
        config = gc.ModelConfig.from_hf(ALL_CONFIGS[name](), exit_layers=[0])
        assert gc.ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_exit_layers_travel_through_hf_config():
    hf = hf_config("llama_mha")  # 4 layers
    config = gc.ModelConfig.from_hf(hf, exit_layers=[2, 0])
    assert config.exit_layers == (0, 2, 3)
    exported = json.loads(config.to_hf().to_json_string())
    assert exported["greencode_exit_layers"] == [0, 2, 3]
    assert gc.ModelConfig.from_hf(exported).exit_layers == (0, 2, 3)
    assert gc.ModelConfig.from_hf(exported, exit_layers=[1]).exit_layers == (1, 3)  # the argument wins


def test_exit_layers_default_and_normalisation():
    hf = hf_config("opt_post_proj")  # 4 layers
    assert gc.ModelConfig.from_hf(hf).exit_layers == (0, 1, 2, 3)
    assert gc.ModelConfig.from_hf(hf, exit_layers=[]).exit_layers == (0, 1, 2, 3)
    assert gc.ModelConfig.from_hf(hf, exit_layers=[1]).exit_layers == (1, 3)  # last layer always added
    assert gc.ModelConfig.from_hf(hf, exit_layers=(2, 0, 2)).exit_layers == (0, 2, 3)  # sorted, unique
    assert gc.ModelConfig.from_hf(hf, exit_layers=[3]).exit_layers == (3,)
    config = gc.ModelConfig.from_hf(hf)
    assert config.replace(exit_layers=(1,)).exit_layers == (1, 3)


@pytest.mark.parametrize("bad", [[4], [-1], [0, 7], 2, 0, ["1"], [1.0], "1"])
def test_exit_layers_validation(bad):
    hf = hf_config("opt_post_proj")  # 4 layers: valid exits are 0..3
    with pytest.raises(gc.GreencodeError, match="exit_layers"):
        gc.ModelConfig.from_hf(hf, exit_layers=bad)
    config = gc.ModelConfig.from_hf(hf)
    with pytest.raises(gc.GreencodeError, match="exit_layers"):
        config.replace(exit_layers=bad)


def test_exit_layers_validation_through_load_pretrained(zoo, tmp_path):
    variant = zoo["opt_post_proj"]
    for bad in ([4], 2):
        with pytest.raises(gc.GreencodeError, match="exit_layers"):
            gc.load_pretrained(variant.path, exit_layers=bad)
    ckpt = gc.save_checkpoint(variant.ours, tmp_path / "ckpt")
    for bad in ([4], 2):
        with pytest.raises(gc.GreencodeError, match="exit_layers"):
            gc.load_pretrained(ckpt, exit_layers=bad)


def test_from_dict_names_closest_field():
    good = gc.ModelConfig.from_hf(hf_config("llama_mha")).to_dict()
    for wrong, right in (("num_layer", "num_layers"), ("hiden_size", "hidden_size"), ("exit_layer", "exit_layers")):
        data = dict(good)
        data[wrong] = data.pop(right)
        with pytest.raises(gc.GreencodeError, match=rf"unknown model config field '{wrong}' \(did you mean '{right}'\?\)"):
            gc.ModelConfig.from_dict(data, source="my_config.json")
    data = dict(good)
    del data["vocab_size"]
    with pytest.raises(gc.GreencodeError, match="vocab_size"):
        gc.ModelConfig.from_dict(data)


@pytest.mark.parametrize("key, value, field", [
    ("pretraining_tp", 2, "pretraining_tp"),
    ("hidden_act", "gelu_pytorch_tanh", "hidden_act"),
    ("hidden_size", "32", "hidden_size"),
    ("num_hidden_layers", None, "num_hidden_layers"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "rope_parameters.rope_type"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}, "rope_parameters"),
    ("sliding_window", 128, "sliding_window"),
])
def test_unsupported_or_malformed_hf_fields_are_named(key, value, field):
    data = json.loads(hf_config("llama_mha").to_json_string())
    data[key] = value
    with pytest.raises(gc.GreencodeError, match=rf"'{field}'") as error:
        gc.ModelConfig.from_hf(data, source="some/config.json")
    assert str(error.value).startswith("some/config.json: ")


# ---- rotary embeddings -------------------------------------------------------------------------------------------

def llama3_by_hand(head_dim, theta, factor, low_freq_factor, high_freq_factor, old_len) -> np.ndarray:
    """Llama 3.1's frequency scaling, element by element in float64 (Meta's reference formula)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high_freq_factor:  # high frequency: unchanged
            out.append(freq)
        elif wavelen > old_len / low_freq_factor:  # low frequency: divided by factor
            out.append(freq / factor)
        else:  # in between: interpolate
            smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_inverse_frequencies():
    hf = hf_config("llama3_rope")
    config = gc.ModelConfig.from_hf(hf)
    assert config.rope_scaling.rope_type == "llama3" and config.head_dim == 16
    ours = rope_inv_freq(config)
    assert ours.dtype == np.float32 and ours.shape == (8,)

    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    assert attention_factor == 1.0
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)

    r = LLAMA3_ROPE
    by_hand = llama3_by_hand(16, r["rope_theta"], r["factor"], r["low_freq_factor"], r["high_freq_factor"],
                             r["original_max_position_embeddings"])
    np.testing.assert_allclose(ours, by_hand, rtol=1e-6, atol=0)

    # the test model exercises all three regimes: unchanged, interpolated, divided by factor
    base = 1.0 / r["rope_theta"] ** (np.arange(0, 16, 2) / 16)
    ratio = by_hand / base
    assert np.isclose(ratio, 1.0).any()
    assert np.isclose(ratio, 1 / r["factor"]).any()
    assert ((ratio > 1 / r["factor"] + 1e-3) & (ratio < 1 - 1e-3)).any()


@pytest.mark.parametrize("name", ["llama_mha", "llama_kv2_bias", "llama_linear_rope"])
def test_default_and_linear_inverse_frequencies(name):
    hf = ALL_CONFIGS[name]()
    config = gc.ModelConfig.from_hf(hf)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        theirs, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    np.testing.assert_allclose(rope_inv_freq(config), theirs.numpy(), rtol=1e-6, atol=0)
    assert rope_inv_freq(config).shape == (config.head_dim // 2,)


def test_rope_scaling_in_transformers4_form():
    """Older config.json files keep rope_theta outside and call the type `type`."""
    data = json.loads(hf_config("llama3_rope").to_json_string())
    params = data.pop("rope_parameters")
    data["rope_theta"] = params.pop("rope_theta")
    data["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    assert gc.ModelConfig.from_hf(data) == gc.ModelConfig.from_hf(hf_config("llama3_rope"))


def test_config_is_hashable_and_frozen():
    config = gc.ModelConfig.from_hf(hf_config("llama3_rope"))
    assert hash(config) == hash(gc.ModelConfig.from_hf(hf_config("llama3_rope")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 2


def test_float_fields_take_yaml_numeric_strings():
    """A finetune config's model section is YAML, where PyYAML reads `1e-6` as a string."""
    import yaml

    hf = {**json.loads(hf_config("llama_kv2_bias").to_json_string()), **yaml.safe_load("rms_norm_eps: 1e-6")}
    assert isinstance(hf["rms_norm_eps"], str)
    assert gc.ModelConfig.from_hf(hf).norm_eps == 1e-6
    with pytest.raises(gc.GreencodeError, match="field 'rms_norm_eps' is 'tiny', expected float"):
        gc.ModelConfig.from_hf({**hf, "rms_norm_eps": "tiny"})
    with pytest.raises(gc.GreencodeError, match="field 'rms_norm_eps' is True, expected float"):
        gc.ModelConfig.from_hf({**hf, "rms_norm_eps": True})
