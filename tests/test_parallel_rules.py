"""Mesh shapes, the logical-axis rules, every parameter's logical axes, and multi-host detection."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from greencode_jax.errors import GreencodeError
from greencode_jax.models import ModelConfig, abstract_model
from greencode_jax.parallel import RULES, logical_spec, mesh_shape
from greencode_jax.parallel.distributed import detect
from greencode_jax.train.sharding import param_logical_axes

MESH = AbstractMesh((2, 4), ("data", "fsdp"))


def test_mesh_shape_fills_one_axis_and_checks_the_product():
    assert mesh_shape(-1, 4, 8) == (2, 4)
    assert mesh_shape(2, -1, 8) == (2, 4)
    assert mesh_shape(8, 1, 8) == (8, 1)
    with pytest.raises(GreencodeError, match="parallel.data=3 x parallel.fsdp=2 = 6 devices, but 8"):
        mesh_shape(3, 2, 8)
    with pytest.raises(GreencodeError, match="cannot be split into fsdp=3"):
        mesh_shape(-1, 3, 8)
    with pytest.raises(GreencodeError, match="both -1"):
        mesh_shape(-1, -1, 8)
    with pytest.raises(GreencodeError, match="parallel.fsdp=0"):
        mesh_shape(1, 0, 8)


def test_rules_table_is_the_one_place_mesh_axes_are_named():
    table = dict(RULES)
    assert table["batch"] == ("data", "fsdp") and table["embed"] == "fsdp"
    assert len(table) == len(RULES)  # one rule per logical axis


def test_logical_spec_applies_the_rules():
    assert logical_spec(("batch", "length"), (8, 16), MESH) == P(("data", "fsdp"))
    assert logical_spec(("micro", "batch", "length"), (2, 8, 16), MESH) == P(None, ("data", "fsdp"))
    assert logical_spec(("embed", "mlp"), (32, 64), MESH) == P("fsdp")
    assert logical_spec(("layers", "mlp", "embed"), (3, 64, 32), MESH) == P(None, None, "fsdp")


def test_logical_spec_drops_axes_that_do_not_divide_or_repeat():
    assert logical_spec(("embed",), (6,), MESH) == P()  # 6 rows on 4 fsdp devices: replicated
    assert logical_spec(("batch",), (2,), MESH) == P("data")  # only the data axis divides 2
    assert logical_spec(("embed", "embed"), (8, 8), MESH) == P("fsdp")  # a mesh axis shards one dimension
    with pytest.raises(ValueError, match="no rule"):
        logical_spec(("nonsense",), (8,), MESH)


TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48, max_position_embeddings=64, norm_eps=1e-5)
CONFIGS = {
    "llama-untied-bias": ModelConfig(family="llama", activation="silu", tie_word_embeddings=False,
                                     attention_bias=True, mlp_bias=True, **TINY),
    "opt-projected-post-ln": ModelConfig(family="opt", activation="relu", tie_word_embeddings=True,
                                         attention_bias=True, mlp_bias=True, embed_dim=16, pre_layer_norm=False,
                                         final_layer_norm=False, **TINY),
    "opt-pre-ln": ModelConfig(family="opt", activation="relu", tie_word_embeddings=True, attention_bias=True,
                              mlp_bias=True, **TINY),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_has_logical_axes_and_each_matrix_is_sharded_along_fsdp(name):
    config = CONFIGS[name]
    params = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        axes = param_logical_axes(path, leaf.shape)
        assert len(axes) == len(leaf.shape)
        if len(leaf.shape) - ("layers" in axes) == 2 and "word_embed" not in axes:
            assert "fsdp" in logical_spec(axes, leaf.shape, MESH), jax.tree_util.keystr(path)


def test_detect_single_process_by_default(monkeypatch):
    for key in ("GREENCODE_COORDINATOR", "GREENCODE_NUM_PROCESSES", "GREENCODE_PROCESS_ID", "GREENCODE_DISTRIBUTED",
                "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert detect() == ("single", {})
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detect() == ("single", {})  # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert detect() == ("slurm", {})
    assert detect("off") == ("single", {})
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert detect() == ("tpu-pod", {})
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("GREENCODE_DISTRIBUTED", "on")
    assert detect() == ("jax-auto", {})


def test_detect_explicit_coordinator(monkeypatch):
    monkeypatch.delenv("GREENCODE_DISTRIBUTED", raising=False)
    monkeypatch.setenv("GREENCODE_COORDINATOR", "localhost:1234")
    monkeypatch.setenv("GREENCODE_NUM_PROCESSES", "2")
    monkeypatch.setenv("GREENCODE_PROCESS_ID", "1")
    assert detect() == ("explicit", {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1})
    monkeypatch.delenv("GREENCODE_PROCESS_ID")
    with pytest.raises(GreencodeError, match="must all be set"):
        detect()
    monkeypatch.setenv("GREENCODE_PROCESS_ID", "two")
    with pytest.raises(GreencodeError, match="GREENCODE_PROCESS_ID='two': expected an integer"):
        detect()
    with pytest.raises(GreencodeError, match="parallel.distributed='maybe'"):
        detect("maybe")
