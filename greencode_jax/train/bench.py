"""`greencode bench train`: our train step against a PyTorch train step, in one process.

Both sides start from the same random weights (the PyTorch model is saved and imported)
and take the same step on the same tokens: the aggregated exit loss (GREEN-CODE weights)
over the same exits, global-norm clipping and AdamW. The steps are timed interleaved
(one of ours, one of theirs, repeated) so background load hits both alike, and the
medians are compared as tokens per second.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from greencode_jax.errors import GreencodeError

TARGET_RATIO = 1.0  # issue 6: our train-step tokens/s >= 1.0x PyTorch's on this CPU
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.01, 1.0


def torch_train_step(model, exits, weights, optimizer, clip_norm):
    """One PyTorch step with the aggregated exit loss; returns the loss (a float)."""
    import torch
    import torch.nn.functional as F

    def step(ids):
        optimizer.zero_grad(set_to_none=True)
        hidden = model.model(ids, output_hidden_states=True).hidden_states
        targets = ids[:, 1:].reshape(-1)
        head = _exit_head(model)
        loss = 0.0
        last = model.config.num_hidden_layers - 1
        for layer, weight in zip(exits, weights):
            # HF's last hidden state already went through the final norm
            h = hidden[-1] if layer == last else head[0](hidden[layer + 1])
            logits = model.lm_head(h if head[1] is None or layer == last else head[1](h))[:, :-1]
            loss = loss + weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        return float(loss.detach())

    return step


def _exit_head(model):
    """(final norm, OPT project_out or None) of a transformers causal LM."""
    if model.config.model_type == "opt":
        decoder = model.model.decoder
        norm = decoder.final_layer_norm if decoder.final_layer_norm is not None else (lambda h: h)
        return norm, decoder.project_out
    return model.model.norm, None


def torch_adamw(model, lr, weight_decay):
    """AdamW with Hugging Face Trainer's decay groups: no decay on biases and norm weights."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "norm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _our_step(model, layout_scan: bool, weights, batch: int, seq_len: int, dtype: str):
    """(step function closing over its state, config) for one layer layout of `model`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from greencode_jax.parallel import make_mesh
    from greencode_jax.train.feed import BatchFeeder
    from greencode_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from greencode_jax.train.step import init_state, make_train_step, state_shardings

    model = nnx.clone(model).set_scan_layers(layout_scan)
    config = model.config
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    schedule = learning_rate_schedule(LEARNING_RATE, 0, 1_000_000)
    optimizer = make_optimizer(schedule, WEIGHT_DECAY, CLIP_NORM)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # the step donates its state
    state = init_state(params, optimizer, 0)
    shardings = state_shardings(jax.eval_shape(lambda: state), config, mesh)
    feeder = BatchFeeder(mesh, 1, batch, seq_len)
    step = make_train_step(config, weights, optimizer, schedule, dtype, shardings, feeder.tokens_sharding,
                           feeder.flags_sharding)
    holder = {"state": jax.device_put(state, shardings)}

    def run(tokens, flags):
        holder["state"], metrics = step(holder["state"], tokens, flags)
        return float(metrics["loss"])

    return run, feeder


def run_bench_train(family: str, fields: dict, shape: str, batch: int = 8, seq_len: int = 256, exits=None,
                    repeats: int = 5, dtype: str = "float32") -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    import greencode_jax as gc
    from greencode_jax.train.weights import exit_weights

    if batch <= 0 or seq_len < 2 or repeats <= 0:
        raise GreencodeError("--batch and --repeats must be positive and --seq-len at least 2")
    n_layers = fields["num_hidden_layers"]
    exits = sorted(set(exits if exits else range(1, n_layers, 2)) | {n_layers - 1})
    if any(not 0 <= e < n_layers for e in exits):
        raise GreencodeError(f"--exit-layers {exits}: outside 0..{n_layers - 1}")
    if seq_len > fields["max_position_embeddings"]:
        raise GreencodeError(f"--seq-len {seq_len} exceeds the shape's {fields['max_position_embeddings']} positions")
    if family == "opt":  # the same function on both sides: no dropout (our models have none)
        fields = {**fields, "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0}
    config_class = transformers.OPTConfig if family == "opt" else transformers.LlamaConfig
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config_class(**fields)).to(torch.float32).train()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        model = gc.load_pretrained(tmp, "float32", exit_layers=exits, scan_layers=True)
    config = model.config
    weights = exit_weights("greencode", config.exit_layers, config.num_layers)

    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq_len)).astype(np.int32)
    torch_ids = torch.from_numpy(ids[0].astype(np.int64))
    theirs = torch_train_step(reference, list(config.exit_layers), weights,
                              torch_adamw(reference, LEARNING_RATE, WEIGHT_DECAY), CLIP_NORM)
    candidates, first_loss, compile_s = {}, {}, {}
    for name, scan in (("stacked", True), ("per_layer", False)):
        run, feeder = _our_step(model, scan, weights, batch, seq_len, dtype)
        tokens = jax.device_put(ids, feeder.tokens_sharding)
        flags = jax.device_put(np.zeros((1,), bool), feeder.flags_sharding)
        start = time.perf_counter()
        first_loss[name] = run(tokens, flags)
        compile_s[name] = time.perf_counter() - start
        candidates[name] = (lambda run=run, tokens=tokens, flags=flags: run(tokens, flags))
    first_loss["torch"] = theirs(torch_ids)
    candidates["torch"] = lambda: theirs(torch_ids)
    for _ in range(2):  # warm-up
        for fn in candidates.values():
            fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):  # interleaved, so background load hits every candidate alike
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    torch_s = seconds.pop("torch")
    best = min(seconds, key=seconds.get)
    tokens_per_step = batch * seq_len
    return {"shape": shape, "batch": batch, "seq_len": seq_len, "exit_layers": list(config.exit_layers),
            "weights": weights, "dtype": dtype, "device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(),
            "first_loss": first_loss, "jax_compile_s": compile_s, "jax_layout_step_s": seconds, "jax_best_layout": best,
            "jax_step_s": seconds[best], "torch_step_s": torch_s, "jax_tokens_per_s": tokens_per_step / seconds[best],
            "torch_tokens_per_s": tokens_per_step / torch_s, "speed_ratio": torch_s / seconds[best],
            "target": TARGET_RATIO}


def print_bench_train(r: dict):
    verdict = "meets" if r["speed_ratio"] >= r["target"] else "MISSES"
    tokens = r["batch"] * r["seq_len"]
    print(f"bench train: shape {r['shape']}, batch {r['batch']} x {r['seq_len']} tokens, exits {r['exit_layers']}, "
          f"{r['dtype']}, {r['device']}, torch {r['torch_threads']} threads")
    losses = r["first_loss"]
    print("  first-step loss          " + "   ".join(f"{k} {v:.5f}" for k, v in losses.items()))
    for layout, seconds in r["jax_layout_step_s"].items():
        print(f"  greencode-jax, {layout + ' layers':17s}{tokens / seconds:8.1f} tokens/s   ({seconds * 1e3:.1f} ms/step, "
              f"compile {r['jax_compile_s'][layout]:.1f} s)")
    print(f"  greencode-jax train step {r['jax_tokens_per_s']:10.1f} tokens/s   ({r['jax_best_layout']} layout)")
    print(f"  transformers PyTorch     {r['torch_tokens_per_s']:10.1f} tokens/s   ({r['torch_step_s'] * 1e3:.1f} ms/step)")
    print(f"  ratio ours / PyTorch     {r['speed_ratio']:10.2f} x   (target >= {r['target']:.1f} x: {verdict})")
