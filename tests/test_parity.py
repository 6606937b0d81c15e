"""Our Flax models against transformers' PyTorch models, and the weight round trips.

Every comparison is against the independent PyTorch implementation run on the same
random weights (see conftest.py), in fp32 with JAX matmuls at "highest" precision.
"""

from __future__ import annotations

import copy
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import greencode_jax as gc
from conftest import NUM_PAD, SEQ_LEN, TOKENIZER_FILES, torch_exit_head

pytestmark = pytest.mark.usefixtures("highest_precision")

LOGITS_ATOL = 1e-4  # ours vs transformers, fp32, >= 500 tokens
ROUND_TRIP_ATOL = 1e-5  # PyTorch on exported weights vs PyTorch on the original weights


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def params_of(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype, path
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


def assert_loads_cleanly(out_dir, original: torch.nn.Module, ids) -> torch.nn.Module:
    """transformers loads the export with no missing/unexpected/mismatched keys and the same logits."""
    cls = type(original)
    # the same attention implementation as the original, so equal weights give equal logits
    reloaded, info = cls.from_pretrained(out_dir, output_loading_info=True,
                                         attn_implementation=original.config._attn_implementation)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    reloaded.eval()
    assert max_abs(torch_logits(reloaded, ids), torch_logits(original, ids)) <= ROUND_TRIP_ATOL
    # Stronger than the logits: every tensor came back bit for bit.
    want, got = original.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    return reloaded


def assert_tokenizer_files(out_dir):
    for file_name, content in TOKENIZER_FILES.items():
        assert json.loads((out_dir / file_name).read_text()) == content, file_name


# ---- forward parity ---------------------------------------------------------------------------------------------

def test_reference_logits_are_order_one(variant):
    """Guards the parity tolerances: logits of HF's default init (std 0.02) would make them vacuous."""
    logits = variant.ref_full.logits.numpy()
    assert logits.shape == (2, SEQ_LEN, variant.torch_model.config.vocab_size)
    assert 0.5 < logits.std() < 50


def test_final_logits_match_transformers(variant):
    ours = np.asarray(variant.ours.logits(variant.ids, variant.full_mask))
    assert ours.dtype == np.float32
    assert max_abs(ours, variant.ref_full.logits) <= LOGITS_ATOL


def test_left_padded_batch_matches_transformers(variant):
    """Row 1 has NUM_PAD padding tokens on the left; only real tokens are compared.

    Llama gets HF's generate()-style position_ids (see conftest); OPT derives positions
    from the mask itself, in transformers and in ours.
    """
    ours = np.asarray(variant.ours.logits(variant.padded_ids, variant.padded_mask))
    ref = variant.ref_padded.logits.numpy()
    real = variant.padded_mask.astype(bool)
    assert real.sum() == 2 * SEQ_LEN - NUM_PAD
    assert max_abs(ours[real], ref[real]) <= LOGITS_ATOL
    # Left padding must not shift positions: the padded row's real tokens see exactly what an
    # unpadded row holding the same tokens sees (here checked through transformers itself).
    unpadded = variant.torch_forward(variant.padded_ids[1:, NUM_PAD:], variant.padded_mask[1:, NUM_PAD:]).logits
    assert max_abs(ours[1, NUM_PAD:], unpadded[0]) <= LOGITS_ATOL


def test_exit_logits_match_transformers_hidden_states(variant):
    """Exit i = transformers' hidden_states[i + 1] through the final norm (+ project_out) and lm_head."""
    model, torch_model, n_layers = variant.ours, variant.torch_model, variant.num_layers
    hidden = variant.ref_full.hidden_states
    assert len(hidden) == n_layers + 1
    assert model.config.exit_layers == tuple(range(n_layers))  # the default: every layer
    with torch.no_grad():
        # hidden_states[-1] is already past the final norm/projection: the last exit is the final logits.
        ref_exits = [torch_exit_head(torch_model, hidden[i + 1]).numpy() for i in range(n_layers - 1)]
    ref_exits.append(variant.ref_full.logits.numpy())

    for i in range(n_layers):
        got = np.asarray(model.logits(variant.ids, variant.full_mask, layer=i))
        assert max_abs(got, ref_exits[i]) <= LOGITS_ATOL, f"layer {i}"

    out = model(jnp.asarray(variant.ids))
    assert out.exit_logits.shape == (n_layers, *variant.ids.shape, torch_model.config.vocab_size)
    assert out.exit_hidden.shape[:2] == (n_layers, 2)
    for k, layer in enumerate(model.config.exit_layers):
        assert max_abs(out.exit_logits[k], ref_exits[layer]) <= LOGITS_ATOL, f"exit {layer}"
        if layer < n_layers - 1:  # exit_hidden is the raw layer output, before the exit head
            assert max_abs(out.exit_hidden[k], hidden[layer + 1]) <= LOGITS_ATOL, f"exit_hidden {layer}"
    assert max_abs(out.logits, ref_exits[-1]) <= LOGITS_ATOL


@pytest.mark.parametrize("name", ["opt_post_proj", "llama_mha"])
def test_exit_layers_override(zoo, name):
    variant = zoo[name]
    assert variant.num_layers == 4
    model = gc.load_pretrained(variant.path, exit_layers=[1])
    assert model.config.exit_layers == (1, 3)  # the last layer is always an exit
    ids = variant.ids[:, :40]
    out = model(jnp.asarray(ids))
    assert out.exit_logits.shape[0] == 2
    with torch.no_grad():
        ref = variant.torch_model(torch.from_numpy(ids), output_hidden_states=True)
        want = [torch_exit_head(variant.torch_model, ref.hidden_states[2]).numpy(), ref.logits.numpy()]
    assert max_abs(out.exit_logits[0], want[0]) <= LOGITS_ATOL
    assert max_abs(out.exit_logits[1], want[1]) <= LOGITS_ATOL


# ---- round trips -------------------------------------------------------------------------------------------------

def test_export_round_trip(variant, tmp_path):
    """HF -> ours -> export_pretrained -> transformers: same keys, same tensors, same logits."""
    out = tmp_path / "export"
    gc.export_pretrained(variant.ours, out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == variant.family
    assert config["greencode_exit_layers"] == list(range(variant.num_layers))
    assert_tokenizer_files(out)
    assert_loads_cleanly(out, variant.torch_model, variant.ids[:, :64])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary siblings left


@pytest.mark.parametrize("name", ["opt_post_proj", "llama3_rope", "llama_kv2_bias"])
def test_round_trip_through_our_checkpoint(zoo, name, tmp_path):
    """HF -> ours -> save_checkpoint -> load_pretrained -> export_pretrained -> transformers."""
    variant = zoo[name]
    ckpt = gc.save_checkpoint(variant.ours, tmp_path / "ckpt")
    assert (ckpt / "greencode_config.json").is_file()
    assert_tokenizer_files(ckpt)
    restored = gc.load_pretrained(ckpt)
    assert restored.config == variant.ours.config
    assert_same_params(restored, variant.ours)

    out = gc.export_pretrained(restored, tmp_path / "export")
    assert_tokenizer_files(out)
    assert_loads_cleanly(out, variant.torch_model, variant.ids[:, :64])
    # exit layers chosen at load time travel with the checkpoint and the export
    ckpt2 = gc.save_checkpoint(gc.load_pretrained(variant.path, exit_layers=[0]), tmp_path / "ckpt2")
    last = variant.num_layers - 1
    assert gc.load_pretrained(ckpt2).config.exit_layers == (0, last)
    assert gc.load_pretrained(ckpt2, exit_layers=[1]).config.exit_layers == tuple(sorted({1, last}))


@pytest.mark.parametrize("name", ["llama_kv2_bias", "opt_post_proj"])
def test_sharded_export(zoo, name, tmp_path):
    variant = zoo[name]
    out = gc.export_pretrained(variant.ours, tmp_path / "export", max_shard_bytes=16 * 1024)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1
    assert "model.safetensors" not in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(files)  # every shard is indexed, and every indexed shard exists
    total = 0
    seen = {}
    for file_name in files:
        with safe_open(str(out / file_name), framework="np") as f:
            assert f.metadata() == {"format": "pt"}, file_name
            for key in f.keys():
                assert key not in seen, f"{key} in {seen.get(key)} and {file_name}"
                seen[key] = file_name
                total += f.get_tensor(key).nbytes
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total
    assert_tokenizer_files(out)
    assert_loads_cleanly(out, variant.torch_model, variant.ids[:, :64])
    assert_same_params(gc.load_pretrained(out), variant.ours)  # our reader follows the index too


# ---- other source layouts ----------------------------------------------------------------------------------------

def copy_config_and_tokenizer(variant, dest):
    dest.mkdir()
    for file_name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(variant.path / file_name, dest / file_name)
    return dest


@pytest.mark.parametrize("name", ["opt_pre_tied", "llama_kv2_bias", "llama3_rope"])
def test_pytorch_bin_source(zoo, name, tmp_path):
    """A pytorch_model.bin checkpoint loads to the same weights and logits as the safetensors one.

    transformers 5 has no safe_serialization=False, so the state dict is written with torch.save
    (for a tied model it then also holds lm_head.weight, as old OPT checkpoints do).
    """
    variant = zoo[name]
    src = copy_config_and_tokenizer(variant, tmp_path / "bin")
    torch.save(variant.torch_model.state_dict(), src / "pytorch_model.bin")
    model = gc.load_pretrained(src)
    assert model.config == variant.ours.config
    assert_same_params(model, variant.ours)
    ids = variant.ids[:, :32]
    assert max_abs(model.logits(ids), variant.ours.logits(ids)) == 0.0
    assert max_abs(model.logits(ids), torch_logits(variant.torch_model, ids)) <= LOGITS_ATOL


@pytest.mark.parametrize("name", ["opt_post_proj", "llama_kv1_tied"])
def test_sharded_safetensors_source(zoo, name, tmp_path):
    variant = zoo[name]
    src = tmp_path / "sharded"
    variant.torch_model.save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()
    model = gc.load_pretrained(src)
    assert model.config == variant.ours.config
    assert_same_params(model, variant.ours)


# ---- bfloat16 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["opt_post_proj", "llama3_rope", "llama_kv2_bias"])
def test_bfloat16(zoo, name):
    """bf16 parameters, fp32 logits close to transformers' fp32 ones.

    bf16 keeps 8 significant bits: each rounding has a relative error of at most 2**-9 (~0.2%).
    Weights and every activation are rounded, through a few layers, so logits are expected to
    move by about 1% of their spread on average and by a few percent at worst over the ~10^5
    logits compared. The bounds below (mean 2%, max 10% of the fp32 logits' std) sit above that
    and far below what a real bug (a wrong cast, a missing scale, bf16 RoPE angles at 500 tokens)
    produces, which is an O(1) fraction of the spread. As a calibration that needs no such
    estimate, our mean error must also be no worse than 1.5x that of transformers' own bf16 run
    of the same weights.
    """
    variant = zoo[name]
    model = gc.load_pretrained(variant.path, dtype="bfloat16")
    dtypes = {path: v.get_value().dtype for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes and all(d == jnp.bfloat16 for d in dtypes.values()), dtypes

    logits = np.asarray(model.logits(variant.ids, variant.full_mask))
    assert logits.dtype == np.float32
    ref = variant.ref_full.logits.numpy()
    scale = ref.std()
    err = np.abs(logits.astype(np.float64) - ref)
    assert err.mean() <= 0.02 * scale, (err.mean(), scale)
    assert err.max() <= 0.10 * scale, (err.max(), scale)
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.95

    torch_bf16 = copy.deepcopy(variant.torch_model).to(torch.bfloat16)
    with torch.no_grad():
        their_logits = torch_bf16(torch.from_numpy(variant.ids)).logits.float().numpy()
    assert err.mean() <= 1.5 * np.abs(their_logits.astype(np.float64) - ref).mean()


@pytest.mark.parametrize("torch_dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_source_and_export(zoo, tmp_path, torch_dtype, name):
    """Hub checkpoints are often bf16/fp16: they load (exactly, into fp32 or their own dtype) and
    a half-precision model exports to a transformers checkpoint of that dtype, bit for bit."""
    variant = zoo["llama_kv2_bias"]
    half = copy.deepcopy(variant.torch_model).to(torch_dtype)
    half.save_pretrained(tmp_path / "src")
    want = {k: v.float().numpy() for k, v in half.state_dict().items()}

    as_fp32 = gc.load_pretrained(tmp_path / "src")
    exported = gc.export_pretrained(as_fp32, tmp_path / "fp32")
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        for key in want:
            assert f.get_tensor(key).dtype == torch.float32
            np.testing.assert_array_equal(f.get_tensor(key).numpy(), want[key], err_msg=key)

    as_half = gc.load_pretrained(tmp_path / "src", dtype=name)
    exported = gc.export_pretrained(as_half, tmp_path / "half")
    assert json.loads((exported / "config.json").read_text())["dtype"] == name
    reloaded = type(half).from_pretrained(exported, dtype="auto")
    assert reloaded.dtype == torch_dtype
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, half.state_dict()[key]), key


def test_checkpoint_dtype(zoo, tmp_path):
    """A checkpoint keeps its dtype; dtype= casts on restore."""
    variant = zoo["llama3_rope"]
    ckpt = gc.save_checkpoint(variant.ours, tmp_path / "fp32")
    as_bf16 = gc.load_pretrained(ckpt, dtype="bfloat16")
    want = {k: v.astype(jnp.bfloat16) for k, v in params_of(variant.ours).items()}
    got = params_of(as_bf16)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(got[key].astype(np.float32), want[key].astype(np.float32), err_msg=str(key))
    ckpt16 = gc.save_checkpoint(as_bf16, tmp_path / "bf16")
    assert json.loads((ckpt16 / "greencode_config.json").read_text())["dtype"] == "bfloat16"
    assert_same_params(gc.load_checkpoint(ckpt16), as_bf16)  # load_checkpoint's default: the saved dtype
    assert_same_params(gc.load_pretrained(ckpt16, dtype="bfloat16"), as_bf16)
