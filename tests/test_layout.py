"""Both layer layouts: stacked (scanned training forward) and per-layer (decoding).

The per-layer model must be the same model: same logits as transformers at every exit,
same parameters after converting back and forth, and the same export.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import greencode_jax as gc
from conftest import torch_exit_head

LOGITS_ATOL = 1e-4


def params(model):
    """Parameters keyed by path, with per-layer arrays stacked, so both layouts compare."""
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if model.config.scan_layers:
        return flat
    stacked = {}
    for path in flat:
        if path[0] == "layers":
            key = ("layers", *path[2:])
            stacked.setdefault(key, []).append((path[1], flat[path]))
        else:
            stacked[path] = flat[path]
    return {k: np.stack([a for _, a in sorted(v)]) if isinstance(v, list) else v for k, v in stacked.items()}


@pytest.mark.parametrize("name", ["opt_post_proj", "llama_kv2_bias"])
def test_per_layer_layout_matches_transformers_at_every_exit(zoo, name, highest_precision):
    variant = zoo[name]
    model = gc.load_pretrained(variant.path, scan_layers=False)
    assert not model.config.scan_layers and len(model.layers) == variant.num_layers
    hidden = variant.ref_full.hidden_states
    for layer in range(variant.num_layers):
        got = np.asarray(model.logits(variant.ids, variant.full_mask, layer=layer))
        if layer == variant.num_layers - 1:
            ref = variant.ref_full.logits.numpy()
        else:
            import torch

            with torch.no_grad():
                ref = torch_exit_head(variant.torch_model, hidden[layer + 1]).numpy()
        assert np.abs(got - ref).max() <= LOGITS_ATOL, f"layer {layer}"


def test_layout_conversion_round_trips_parameters_exactly(zoo, tmp_path):
    variant = zoo["llama_kv1_tied"]
    model = gc.load_pretrained(variant.path)  # stacked
    before = params(model)
    model.set_scan_layers(False)
    assert isinstance(model.layers, nnx.List)
    assert params(model).keys() == before.keys()
    for key, value in params(model).items():
        np.testing.assert_array_equal(value, before[key], err_msg=str(key))
    model.set_scan_layers(True)
    for key, value in params(model).items():
        np.testing.assert_array_equal(value, before[key], err_msg=str(key))


def test_checkpoint_and_export_from_either_layout(zoo, tmp_path):
    variant = zoo["opt_pre_tied"]
    per_layer = gc.load_pretrained(variant.path, scan_layers=False)
    gc.save_checkpoint(per_layer, tmp_path / "ckpt")
    assert not gc.load_pretrained(tmp_path / "ckpt").config.scan_layers  # a checkpoint keeps its layout
    stacked = gc.load_pretrained(tmp_path / "ckpt", scan_layers=True)
    reference = params(gc.load_pretrained(variant.path))
    for key, value in params(stacked).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=str(key))

    gc.export_pretrained(per_layer, tmp_path / "hf", max_shard_bytes=4096)
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = variant.torch_model.state_dict()
    for key, value in exported.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)


def test_remat_and_scan_give_the_same_gradients(zoo):
    """Rematerialisation and the layout change how the forward runs, never what it computes."""
    variant = zoo["llama_mha"]
    ids = variant.ids[:, :64]

    def grads(scan, remat):
        model = gc.load_pretrained(variant.path, scan_layers=scan)
        model.config = model.config.replace(remat=remat)
        g = nnx.grad(lambda m: m(ids).exit_logits.sum())(model)
        return params_like(g, model.config.scan_layers)

    def params_like(state, scan):
        holder = gc.load_pretrained(variant.path, scan_layers=scan)
        nnx.update(holder, state)
        return params(holder)

    with jax.default_matmul_precision("highest"):
        reference = grads(True, False)
        for scan, remat in [(True, True), (False, False), (False, True)]:
            got = grads(scan, remat)
            for key, value in got.items():
                np.testing.assert_allclose(value, reference[key], rtol=1e-4, atol=1e-4, err_msg=f"{scan} {remat} {key}")
