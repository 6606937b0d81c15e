"""Bad inputs raise GreencodeError naming the file/field/tensor, and leave no output behind."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch

import greencode_jax as gc
from greencode_jax.ownership import write_manifest
from conftest import assert_no_output


def convert(src, out, writer="export"):
    """What `greencode convert-from-hf` / an export script does: load, then write atomically."""
    model = gc.load_pretrained(src)
    if writer == "export":
        gc.export_pretrained(model, out)
    else:
        gc.save_checkpoint(model, out)


@pytest.fixture(params=["llama_kv2_bias", "opt_post_proj"])
def source(request, zoo, tmp_path):
    """A private copy of a tiny HF model directory, to break."""
    return shutil.copytree(zoo[request.param].path, tmp_path / "src")


@pytest.fixture
def llama_source(zoo, tmp_path):
    return shutil.copytree(zoo["llama_kv2_bias"].path, tmp_path / "src")


def edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def edit_tensors(src, edit):
    tensors = safetensors.numpy.load_file(src / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def expect_error(src, out, pattern, writer="export"):
    with pytest.raises(gc.GreencodeError, match=pattern) as error:
        convert(src, out, writer)
    assert_no_output(out)
    return str(error.value)


# ---- bad sources ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["export", "checkpoint"])
def test_missing_tensor(source, tmp_path, writer):
    name = ("model.layers.1.mlp.up_proj.weight" if "llama" in (source / "config.json").read_text()
            else "model.decoder.layers.1.fc1.bias")
    edit_tensors(source, lambda t: t.pop(name))
    message = expect_error(source, tmp_path / "out", re.escape(f"tensor '{name}' is missing"), writer)
    assert str(source) in message


def test_wrong_shape(source, tmp_path):
    is_llama = "llama" in (source / "config.json").read_text()
    name = "model.layers.0.self_attn.k_proj.weight" if is_llama else "model.decoder.layers.0.self_attn.k_proj.weight"

    def edit(tensors):
        expected = list(tensors[name].shape)
        tensors[name] = np.zeros((expected[0] + 8, expected[1]), tensors[name].dtype)
        edit.expected = expected

    edit_tensors(source, edit)
    message = expect_error(source, tmp_path / "out", re.escape(f"tensor '{name}' has shape"))
    assert f"expected {edit.expected}" in message
    assert str(source / "model.safetensors") in message


def test_unexpected_tensor(llama_source, tmp_path):
    edit_tensors(llama_source, lambda t: t.update({"model.layers.0.self_attn.rope_bias": np.zeros(3, np.float32)}))
    expect_error(llama_source, tmp_path / "out", re.escape("unexpected tensor 'model.layers.0.self_attn.rope_bias'"))


def test_unknown_model_type(source, tmp_path):
    edit_config(source, model_type="gpt2")
    message = expect_error(source, tmp_path / "out", "unsupported model_type 'gpt2'")
    assert str(source / "config.json") in message


def test_unsupported_rope_type(llama_source, tmp_path):
    edit_config(llama_source, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 64})
    message = expect_error(llama_source, tmp_path / "out", re.escape("'rope_parameters.rope_type'"))
    assert "yarn" in message and str(llama_source / "config.json") in message


def test_sliding_window(llama_source, tmp_path):
    edit_config(llama_source, sliding_window=256)
    message = expect_error(llama_source, tmp_path / "out", "'sliding_window'")
    assert "256" in message and str(llama_source / "config.json") in message


@pytest.mark.parametrize("keep", ["half", "header_length", "part_of_header"])
def test_truncated_safetensors(source, tmp_path, keep):
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:{"half": len(data) // 2, "header_length": 5, "part_of_header": header_end // 2}[keep]])
    expect_error(source, tmp_path / "out", re.escape(str(weights)) + ".*(corrupt|truncated)")


def test_truncated_shard_of_sharded_source(zoo, tmp_path):
    src = tmp_path / "src"
    zoo["opt_post_proj"].torch_model.save_pretrained(src, max_shard_size="20KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) - 100])
    expect_error(src, tmp_path / "out", re.escape(str(shards[-1])))


def test_index_naming_a_missing_shard(zoo, tmp_path):
    src = tmp_path / "src"
    zoo["llama_kv1_tied"].torch_model.save_pretrained(src, max_shard_size="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    message = expect_error(src, tmp_path / "out", re.escape(str(src / "model.safetensors.index.json")))
    assert shard.name in message


def test_corrupt_pytorch_bin(llama_source, tmp_path):
    (llama_source / "model.safetensors").unlink()
    (llama_source / "pytorch_model.bin").write_bytes(b"this is not a pickle" * 10)
    expect_error(llama_source, tmp_path / "out", re.escape(str(llama_source / "pytorch_model.bin")))


def test_missing_tensor_in_pytorch_bin(zoo, tmp_path):
    variant = zoo["opt_pre_tied"]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(variant.path / "config.json", src)
    state = variant.torch_model.state_dict()
    del state["model.decoder.final_layer_norm.weight"]
    torch.save(state, src / "pytorch_model.bin")
    expect_error(src, tmp_path / "out", re.escape("tensor 'model.decoder.final_layer_norm.weight' is missing"))


def test_no_weights(llama_source, tmp_path):
    (llama_source / "model.safetensors").unlink()
    expect_error(llama_source, tmp_path / "out", re.escape(str(llama_source)) + ": no weights found")


def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    expect_error(missing, tmp_path / "out", re.escape(str(missing)) + ": no such directory")


def test_path_is_a_file(llama_source, tmp_path):
    expect_error(llama_source / "config.json", tmp_path / "out", "expected a model directory or a .gguf file, found another file")


def test_config_not_json(source, tmp_path):
    (source / "config.json").write_text('{"model_type": "llama", ')
    expect_error(source, tmp_path / "out", re.escape(str(source / "config.json")) + ".*not valid JSON")


def test_config_missing(source, tmp_path):
    (source / "config.json").unlink()
    expect_error(source, tmp_path / "out", re.escape(str(source / "config.json")) + ".*not found")


def test_bad_dtype(zoo):
    with pytest.raises(gc.GreencodeError, match="float64"):
        gc.load_pretrained(zoo["llama_mha"].path, dtype="float64")


def test_corrupt_checkpoint_config(zoo, tmp_path):
    ckpt = gc.save_checkpoint(zoo["llama_mha"].ours, tmp_path / "ckpt")
    meta = json.loads((ckpt / "greencode_config.json").read_text())
    meta["model"]["num_layer"] = meta["model"].pop("num_layers")
    (ckpt / "greencode_config.json").write_text(json.dumps(meta))
    with pytest.raises(gc.GreencodeError, match=r"greencode_config\.json.*'num_layer'.*did you mean 'num_layers'"):
        gc.load_pretrained(ckpt)
    shutil.rmtree(ckpt / "params")
    meta["model"]["num_layers"] = meta["model"].pop("num_layer")
    (ckpt / "greencode_config.json").write_text(json.dumps(meta))
    with pytest.raises(gc.GreencodeError, match="params"):
        gc.load_pretrained(ckpt)


# ---- outputs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["export", "checkpoint"])
def test_output_exists(zoo, tmp_path, writer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(gc.GreencodeError, match=re.escape(str(out)) + ": already exists"):
        convert(zoo["llama_mha"].path, out, writer)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling


@pytest.mark.parametrize("writer", ["export", "checkpoint"])
def test_overwrite_replaces_output_atomically(zoo, tmp_path, writer):
    variant = zoo["llama_mha"]
    out = tmp_path / "out"
    out.mkdir()  # an earlier output of the same kind (its manifest says so), holding a stale file
    write_manifest(out, "hf-export" if writer == "export" else "checkpoint")
    (out / "stale.txt").write_text("old")
    write = gc.export_pretrained if writer == "export" else gc.save_checkpoint
    write(variant.ours, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp-* / .out.old-* left
    reloaded = gc.load_pretrained(out)
    assert reloaded.config == variant.ours.config


def test_output_parent_missing_is_created(zoo, tmp_path):
    out = tmp_path / "missing_parent" / "out"
    gc.export_pretrained(zoo["llama_mha"].ours, out)
    assert (out / "config.json").is_file()


def test_output_parent_not_a_directory(zoo, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "sub" / "out"
    with pytest.raises(gc.GreencodeError, match=re.escape(str(tmp_path / "a_file")) + ": not a directory"):
        gc.export_pretrained(zoo["llama_mha"].ours, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_failure_while_writing_leaves_nothing(zoo, tmp_path, monkeypatch):
    """A crash after some shards are on disk removes the temporary directory."""
    calls = []
    real_save = safetensors.numpy.save_file

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        gc.export_pretrained(zoo["llama_mha"].ours, out, max_shard_bytes=16 * 1024)
    assert len(calls) == 2
    assert_no_output(out)


def test_failure_while_checkpointing_leaves_nothing(zoo, tmp_path, monkeypatch):
    import greencode_jax.convert.checkpoint as checkpoint

    def failing_copy(source_dir, out_dir):
        assert (out_dir / "params").is_dir()  # parameters were already written
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "copy_tokenizer_files", failing_copy)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        gc.save_checkpoint(zoo["llama_mha"].ours, out)
    assert_no_output(out)


def test_failed_overwrite_keeps_the_old_output(zoo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()  # an earlier export (its manifest says so)
    write_manifest(out, "hf-export")
    (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        gc.export_pretrained(zoo["llama_mha"].ours, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before == [".greencode-output.json", "keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- model inputs --------------------------------------------------------------------------------------------------

def test_bad_model_inputs(zoo):
    variant = zoo["llama_mha"]
    model, n_layers = variant.ours, variant.num_layers
    ids = variant.ids[:, :8]
    with pytest.raises(gc.GreencodeError, match=rf"layer={n_layers}.*0\.\.{n_layers - 1}"):
        model.logits(ids, layer=n_layers)
    with pytest.raises(gc.GreencodeError, match="layer=-1"):
        model.logits(ids, layer=-1)
    with pytest.raises(gc.GreencodeError, match="max_position_embeddings=640"):
        model.logits(np.zeros((1, 641), np.int32))
    with pytest.raises(gc.GreencodeError, match="attention_mask"):
        model.logits(ids, np.ones((2, 9), np.int32))
    with pytest.raises(gc.GreencodeError, match="input_ids"):
        model.logits(ids.astype(np.float32))
