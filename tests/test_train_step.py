"""One train step against independent references.

The reference loss is computed in NumPy (float64 log-softmax) from the exit logits of the
PyTorch model itself (transformers, with its own final norm / project_out / LM head as the
exit head); the reference gradient and update come from torch autograd and
torch.optim.AdamW on the same weighted loss, with clipping and Hugging Face's decay groups.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import greencode_jax as gc
from conftest import torch_exit_head
from greencode_jax.parallel import logical_sharding, make_mesh
from greencode_jax.train.optimizer import learning_rate_schedule, make_optimizer
from greencode_jax.train.step import init_state, make_train_step, state_shardings

B, T = 3, 24
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.1, 0.5


def tokens_for(vocab_size: int, rows: int = B, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab_size, (rows, T)).astype(np.int32)


def our_step(path, exits, weights, tokens, grad_accum=1, compute_dtype="float32", remat=False, sgd=False,
             scan_layers=True):
    """One jitted step of ours on a 1-device mesh: (metrics, new params, the model's config).

    `sgd`: plain SGD with learning rate 1 instead of clipped AdamW, so the step subtracts
    the raw gradient and gradients can be compared without Adam's normalisation (which
    turns a rounding difference in a near-zero gradient element into a +-lr update)."""
    model = gc.load_pretrained(path, "float32", exit_layers=exits, scan_layers=scan_layers)
    config = model.config.replace(remat=remat)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    schedule = learning_rate_schedule(LR, 0, 100)
    optimizer = optax.sgd(1.0) if sgd else make_optimizer(schedule, WEIGHT_DECAY, CLIP)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    state = init_state(params, optimizer, 0)
    shardings = state_shardings(jax.eval_shape(lambda: state), config, mesh)
    rows = tokens.shape[0] // grad_accum
    tokens_sharding = logical_sharding(("micro", "batch", "length"), (grad_accum, rows, T), mesh)
    flags_sharding = logical_sharding(("batch",), (1,), mesh)
    step = make_train_step(config, weights, optimizer, schedule, compute_dtype, shardings, tokens_sharding,
                           flags_sharding)
    new_state, metrics = step(state, tokens.reshape(grad_accum, rows, T), np.zeros((1,), bool))
    return jax.device_get(metrics), jax.device_get(new_state["params"]), config


def torch_exit_logits(variant, exits, tokens):
    """[n_exits, B, T, V] logits of the PyTorch model at each exit, as a list of tensors (with grad)."""
    model = variant.torch_model
    out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    last = model.config.num_hidden_layers - 1
    return [out.logits if layer == last else torch_exit_head(model, out.hidden_states[layer + 1])
            for layer in exits]


def numpy_weighted_ce(logits: list[np.ndarray], tokens: np.ndarray, weights):
    """Hand-computed: per-exit mean next-token cross-entropy and accuracy, and their weighted sum."""
    targets = tokens[:, 1:]
    losses, accuracies = [], []
    for z in logits:
        z = z[:, :-1].astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
        losses.append(-np.take_along_axis(log_probs, targets[..., None], -1).mean())
        accuracies.append((z.argmax(-1) == targets).mean())
    return float(np.dot(weights, losses)), np.array(losses), np.array(accuracies)


@pytest.mark.parametrize("name, exits, weights", [
    ("llama_mha", [0, 2], [0.5, 0.3, 0.2]),  # untied LM head, RMSNorm
    ("opt_pre_tied", [0], [0.7, 0.3]),  # tied head, final LayerNorm
    ("opt_post_proj", [1], [0.6, 0.4]),  # no final norm, project_out before the tied head
])
def test_step_loss_and_update_match_numpy_and_pytorch(zoo, name, exits, weights, highest_precision):
    variant = zoo[name]
    tokens = tokens_for(variant.torch_model.config.vocab_size)
    metrics, new_params, config = our_step(variant.path, exits, weights, tokens)
    all_exits = list(config.exit_layers)

    # the loss, per-exit losses and accuracies: NumPy from PyTorch's exit logits
    torch_model = variant.torch_model
    torch_model.zero_grad(set_to_none=True)
    logits = torch_exit_logits(variant, all_exits, tokens)
    loss, losses, accuracies = numpy_weighted_ce([z.detach().numpy() for z in logits], tokens, weights)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-6)
    np.testing.assert_allclose(metrics["exit_loss"], losses, rtol=2e-6)
    np.testing.assert_allclose(metrics["exit_accuracy"], accuracies, atol=1e-7)

    # the gradient: torch autograd of the same weighted loss
    targets = torch.from_numpy(tokens[:, 1:]).long().reshape(-1)
    torch_loss = sum(w * F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), targets) for w, z in zip(weights, logits))
    torch_loss.backward()
    params = [p for p in torch_model.parameters()]
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)).item()
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)

    # the update: clip to CLIP, then AdamW with no decay on biases and norms
    decay = [p for n, p in torch_model.named_parameters() if not (n.endswith("bias") or "norm" in n)]
    no_decay = [p for n, p in torch_model.named_parameters() if n.endswith("bias") or "norm" in n]
    before = {n: p.detach().clone() for n, p in torch_model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, eps=1e-8)
    optimizer.step()
    after = dict(torch_model.named_parameters())
    try:
        prefix = "model.decoder" if variant.family == "opt" else "model"
        pairs = {  # ours (stacked layers: [layer, out, in]) -> PyTorch ([out, in])
            "embedding": (new_params["embed_tokens"]["embedding"], after[f"{prefix}.embed_tokens.weight"]),
            "q_proj layer 1": (new_params["layers"]["attn"]["q_proj"]["kernel"][1],
                               after[f"{prefix}.layers.1.self_attn.q_proj.weight"]),
            "attn_norm layer 0": (new_params["layers"]["attn_norm"]["scale"][0],
                                  after[f"{prefix}.layers.0.{'input_layernorm' if variant.family == 'llama' else 'self_attn_layer_norm'}.weight"]),
        }
        for label, (ours, theirs) in pairs.items():
            theirs, start = theirs.detach().numpy(), before_by_value(before, after, theirs)
            # The step really moved the weights (Adam's first step: ~lr per element)...
            assert np.abs(theirs - start).max() > 0.5 * LR, label
            # ...and both moved them alike: Adam's first update is lr * g / (|g| + eps) ~ +-lr per element,
            # so the fp32 rounding of the two gradients shows only as fp32 ulps of the O(1) weights.
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6, err_msg=label)
    finally:
        torch_model.zero_grad(set_to_none=True)
        with torch.no_grad():  # the session's PyTorch model is shared: put its weights back
            for n, p in torch_model.named_parameters():
                p.copy_(before[n])


def before_by_value(before: dict, after: dict, tensor) -> np.ndarray:
    """The pre-step value of the PyTorch parameter `tensor`."""
    for name, param in after.items():
        if tensor is param:
            return before[name].numpy()
    raise KeyError("parameter not found")


def test_bf16_compute_keeps_fp32_master_weights(zoo, highest_precision):
    variant = zoo["llama_mha"]
    tokens = tokens_for(variant.torch_model.config.vocab_size)
    weights = [0.5, 0.3, 0.2]
    metrics, new_params, config = our_step(variant.path, [0, 2], weights, tokens, compute_dtype="bfloat16")
    with torch.no_grad():
        logits = [z.numpy() for z in torch_exit_logits(variant, list(config.exit_layers), tokens)]
    loss, losses, _ = numpy_weighted_ce(logits, tokens, weights)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(new_params))
    # bf16 has an 8-bit mantissa: O(1) logits of a 4-layer model carry ~1 % relative error, the losses less
    np.testing.assert_allclose(metrics["exit_loss"], losses, rtol=2e-2)
    assert abs(metrics["loss"] - loss) > 1e-5  # the forward really ran in bf16, not fp32
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


def gradient(zoo_variant, new_params, scan_layers=True):
    """SGD with learning rate 1: the gradient is what the step subtracted."""
    start = nnx.to_pure_dict(nnx.state(gc.load_pretrained(zoo_variant.path, scan_layers=scan_layers), nnx.Param))
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), start, new_params)


def assert_same_gradient(a, b):
    # gradients recovered as p - (p - g) carry the fp32 rounding of O(1) weights: ~1e-7 absolute
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_remat_changes_memory_not_results(zoo, highest_precision):
    variant = zoo["llama_mha"]
    tokens = tokens_for(variant.torch_model.config.vocab_size)
    plain, plain_params, _ = our_step(variant.path, [0, 2], [0.5, 0.3, 0.2], tokens, sgd=True)
    remat, remat_params, config = our_step(variant.path, [0, 2], [0.5, 0.3, 0.2], tokens, remat=True, sgd=True)
    assert config.remat
    # the same operations, recomputed: only XLA's fusion choices may differ (a few fp32 ulps)
    np.testing.assert_allclose(remat["loss"], plain["loss"], rtol=1e-6)
    np.testing.assert_allclose(remat["grad_norm"], plain["grad_norm"], rtol=1e-5)
    assert_same_gradient(gradient(variant, remat_params), gradient(variant, plain_params))


def test_gradient_accumulation_equals_one_big_batch(zoo, highest_precision):
    variant = zoo["llama_mha"]
    tokens = tokens_for(variant.torch_model.config.vocab_size, rows=4, seed=1)
    whole, whole_params, _ = our_step(variant.path, [0, 2], [0.5, 0.3, 0.2], tokens, grad_accum=1, sgd=True)
    accum, accum_params, _ = our_step(variant.path, [0, 2], [0.5, 0.3, 0.2], tokens, grad_accum=2, sgd=True)
    # the mean over 2 micro-batches of 2 rows is the mean over 4 rows, summed in another order
    np.testing.assert_allclose(accum["loss"], whole["loss"], rtol=1e-6)
    np.testing.assert_allclose(accum["exit_loss"], whole["exit_loss"], rtol=1e-6)
    np.testing.assert_allclose(accum["grad_norm"], whole["grad_norm"], rtol=1e-5)
    assert_same_gradient(gradient(variant, accum_params), gradient(variant, whole_params))


def test_per_layer_layout_trains_like_the_stacked_one(zoo, highest_precision):
    variant = zoo["llama_mha"]
    tokens = tokens_for(variant.torch_model.config.vocab_size)
    stacked, stacked_params, _ = our_step(variant.path, [0, 2], [0.5, 0.3, 0.2], tokens, sgd=True)
    per_layer, per_layer_params, config = our_step(variant.path, [0, 2], [0.5, 0.3, 0.2], tokens, sgd=True,
                                                   scan_layers=False)
    assert not config.scan_layers and len(per_layer_params["layers"]) == 4
    np.testing.assert_allclose(per_layer["loss"], stacked["loss"], rtol=1e-6)
    g_stacked = gradient(variant, stacked_params)
    g_per_layer = gradient(variant, per_layer_params, scan_layers=False)
    for i in range(4):  # layer i of the stacked gradient is the per-layer gradient of layer i
        assert_same_gradient(jax.tree.map(lambda x: x[i], g_stacked["layers"]), g_per_layer["layers"][i])
