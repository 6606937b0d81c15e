"""A checkpoint saved from mesh-sharded parameters loads in a one-device process."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import greencode_jax as gc
from greencode_jax.convert import load_checkpoint
from greencode_jax.models import ModelConfig, init_model
from test_train_support import REPO, compile_cache, subprocess_env  # noqa: F401 (fixture)

CONFIG = ModelConfig(family="llama", activation="silu", tie_word_embeddings=False, attention_bias=False,
                     mlp_bias=False, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-5, exit_layers=(0, 1))
SEED = 3

# Runs with 8 fake CPU devices: the tiny model's parameters placed on a (data=2, fsdp=4) mesh by
# the training rules, then written by our save_checkpoint as they are.
SAVE_SHARDED = """
import sys, jax
from flax import nnx
import greencode_jax as gc
from greencode_jax.models import ModelConfig, init_model
from greencode_jax.parallel import make_mesh
from greencode_jax.train.sharding import tree_shardings

assert jax.device_count() == 8, jax.devices()
config = ModelConfig.from_dict({config!r})
model = init_model(config, "float32", seed={seed})
state = nnx.state(model, nnx.Param)
params = nnx.to_pure_dict(state)
shardings = tree_shardings(params, make_mesh(data=2, fsdp=4), config.hidden_size, config.hidden_size)
nnx.replace_by_pure_dict(state, jax.device_put(params, shardings))
nnx.update(model, state)
kernel = model.lm_head.kernel.get_value()
assert len(kernel.sharding.device_set) == 8 and "fsdp" in kernel.sharding.spec, kernel.sharding
gc.save_checkpoint(model, sys.argv[1])
"""


def test_checkpoint_saved_sharded_over_8_devices_loads_on_one(tmp_path, compile_cache):
    out = tmp_path / "sharded"
    script = SAVE_SHARDED.format(config=CONFIG.to_dict(), seed=SEED)
    env = subprocess_env(compile_cache, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    # the checkpoint really records the 8-device mesh...
    saved = ocp.StandardCheckpointer().metadata((out / "params").absolute()).item_metadata
    assert list(saved["lm_head"]["kernel"].sharding.shape) == [2, 4]

    # ...and this one-device process loads it, through both entry points, onto its own device
    assert jax.device_count() == 1
    ids = np.array([[1, 5, 9, 2, 33, 7, 12, 60], [4, 4, 8, 15, 16, 23, 42, 0]], dtype=np.int32)
    stacked = init_model(CONFIG, "float32", seed=SEED)
    per_layer = init_model(CONFIG, "float32", seed=SEED).set_scan_layers(False)
    for loaded in (gc.load_pretrained(out), load_checkpoint(out, scan_layers=False)):
        assert loaded.config == CONFIG.replace(scan_layers=loaded.config.scan_layers)
        for array in jax.tree.leaves(nnx.state(loaded, nnx.Param)):
            assert array.sharding.is_fully_replicated and len(array.sharding.device_set) == 1
        same, other = (stacked, per_layer) if loaded.config.scan_layers else (per_layer, stacked)
        for layer in (*CONFIG.exit_layers, None):
            got = np.asarray(loaded.logits(ids, layer=layer))
            # the same layout is the same compiled program on the same weights: bit for bit
            np.testing.assert_array_equal(got, np.asarray(same.logits(ids, layer=layer)), err_msg=f"layer {layer}")
            # the other layout is another program (a scan vs unrolled layers) that XLA may fuse and order
            # differently: float32 sums then differ by a rounding step or two (3e-8 seen, on logits up to
            # 0.35). The tolerance allows ~30 such steps; loading the two layers swapped moves them by 0.16.
            np.testing.assert_allclose(got, np.asarray(other.logits(ids, layer=layer)), rtol=1e-5, atol=1e-6,
                                       err_msg=f"layer {layer}")


def _write_checkpoint(out, params, version):
    """A checkpoint directory as save_checkpoint writes it, with the given format version."""
    import json

    out.mkdir()
    meta = {"format": "greencode-jax", "version": version, "dtype": "float32", "model": CONFIG.to_dict()}
    (out / "greencode_config.json").write_text(json.dumps(meta))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((out / "params").absolute(), params)
    checkpointer.wait_until_finished()


def test_version_1_checkpoint_with_in_out_kernels_loads_with_the_same_logits(tmp_path):
    """Format version 1 stored Linear kernels [in, out]. CONFIG's q_proj and o_proj are square,
    so a migration that forgot them would restore without a shape error, transposed."""
    import pytest

    from greencode_jax.errors import GreencodeError

    original = init_model(CONFIG, "float32", seed=SEED)
    params = nnx.to_pure_dict(nnx.state(original, nnx.Param))
    in_out = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x).swapaxes(-1, -2) if path[-1].key == "kernel" else np.asarray(x), params)
    _write_checkpoint(tmp_path / "v1", in_out, version=1)
    ids = np.array([[1, 5, 9, 2, 33, 7, 12, 60]], dtype=np.int32)
    loaded = load_checkpoint(tmp_path / "v1")
    for layer in CONFIG.exit_layers:
        np.testing.assert_array_equal(np.asarray(loaded.logits(ids, layer=layer)),
                                      np.asarray(original.logits(ids, layer=layer)))

    _write_checkpoint(tmp_path / "v3", params, version=3)
    with pytest.raises(GreencodeError, match="checkpoint format version 3; this greencode-jax reads versions 1 to 2"):
        load_checkpoint(tmp_path / "v3")


def test_a_one_layer_stacked_model_exports_plain_tensors(tmp_path):
    """A stacked (scan_layers) array of a 1-layer model still has its layer axis: the export must
    drop it, as transformers expects [out, in], not [1, out, in]."""
    import torch
    import transformers

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=8, intermediate_size=32, max_position_embeddings=32, norm_eps=1e-5,
                         activation="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         scan_layers=True)
    model = init_model(config, seed=3)
    out = gc.export_pretrained(model, tmp_path / "hf")
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = np.random.default_rng(0).integers(0, 64, (1, 12))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.logits(ids))
    np.testing.assert_allclose(ours, expected, atol=1e-4)  # two programs, fp32: rounding only
