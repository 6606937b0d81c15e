"""`greencode bench train`: our train step against a PyTorch train step, in one process.

Both sides start from the same random weights (the PyTorch model is saved and imported)
and take the same step on the same tokens: the aggregated exit loss (GREEN-CODE weights)
over the same exits, global-norm clipping and AdamW. The steps are timed interleaved
(one of ours, one of theirs, repeated) so background load hits both alike, and the
medians are compared as tokens per second.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from greencode_jax.bench.report import verdict
from greencode_jax.bench.zoo import interleaved_seconds, torch_device as choose_torch_device
from greencode_jax.convert import load_pretrained
from greencode_jax.convert.hf_export import quiet_transformers
from greencode_jax.errors import GreencodeError
from greencode_jax.models.model import param_arrays
from greencode_jax.parallel import make_mesh
from greencode_jax.train.feed import BatchFeeder
from greencode_jax.train.optimizer import learning_rate_schedule, make_optimizer
from greencode_jax.train.step import init_state, make_train_step, state_shardings
from greencode_jax.train.weights import exit_weights

TARGET_RATIO = 1.0  # our train-step tokens/s >= 1.0x PyTorch's on this CPU
TARGET_MFU = 0.35  # on a GPU: bf16 train step of a ~1B Llama, aim >= 35 % MFU
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.01, 1.0

# Dense bf16 peak FLOP/s by JAX device_kind prefix (vendor data sheets; SXM parts)
PEAK_BF16_FLOPS = {"NVIDIA H200": 989.4e12, "NVIDIA H100": 989.4e12, "NVIDIA A100": 312e12,
                   "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


def peak_flops(device_kind: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when it is not in the table (CPUs)."""
    return next((peak for prefix, peak in PEAK_BF16_FLOPS.items() if device_kind.startswith(prefix)), None)


def train_flops_per_token(model, exit_layers, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward = 3x forward, no remat recompute).

    Forward, per token: 2 FLOPs per weight of every matrix in the decoder layers; the exit
    head (OPT's project_out and the LM head) once per exit; causal attention's scores and
    weighted values, 2 * 2 * attention width * (seq_len + 1) / 2 per layer (the mean
    number of keys a query sees). Norms, activations and the softmax are left out.
    """
    config = model.config
    blocks = [model.block(i) for i in range(config.num_layers)]
    layer_matrices = sum(x.size for x in param_arrays(*blocks) if x.ndim == 2)
    head_matrices = sum(x.size for x in param_arrays(*model.exit_head_modules()) if x.ndim == 2)
    attention_width = config.num_heads * config.head_dim
    attention = config.num_layers * 2 * 2 * attention_width * (seq_len + 1) / 2
    forward = 2 * layer_matrices + 2 * head_matrices * len(exit_layers) + attention
    return 3 * forward


def torch_train_step(model, exits, weights, optimizer, clip_norm, compute_dtype: str = "float32"):
    """One PyTorch step with the aggregated exit loss; returns the loss (a float). With a
    bfloat16 compute dtype the forward runs under autocast over the fp32 weights, as ours
    computes in bf16 over fp32 masters."""
    import torch
    import torch.nn.functional as F

    device_type = next(model.parameters()).device.type

    def step(ids):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
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
    """(step function closing over its state, its batch feeder) for one layer layout of `model`."""
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


def run_bench_train(family: str, fields: dict, shape: str, *, batch: int = 8, seq_len: int = 256, exits=None,
                    repeats: int = 5, dtype: str = "float32", layouts=("stacked", "per_layer"),
                    reference: bool = True, torch_device: str | None = None, peak: float | None = None) -> dict:
    """Times our train step in each of `layouts` (and the PyTorch step unless `reference` is
    False) and reports tokens/s, their ratio and, where the device's peak is known (or
    `peak` FLOP/s is given), the model FLOPs utilisation of our faster layout. `family` and
    `fields` are a transformers config (`zoo.shape_fields(shape)`)."""
    import torch

    exits, fields = _checked(family, fields, batch, seq_len, repeats, layouts, exits)
    device = choose_torch_device(torch_device) if reference else None
    torch_model, model = _same_weights(family, fields, exits)
    config = model.config
    weights = exit_weights("greencode", config.exit_layers, config.num_layers)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq_len)).astype(np.int32)
    if reference:
        torch_model = torch_model.to(device)
        torch_ids = torch.from_numpy(ids[0].astype(np.int64)).to(device)
        theirs = torch_train_step(torch_model, list(config.exit_layers), weights,
                                  torch_adamw(torch_model, LEARNING_RATE, WEIGHT_DECAY), CLIP_NORM, dtype)
    else:
        del torch_model  # its memory is ours now
    candidates, first_loss, compile_s = {}, {}, {}
    for name in layouts:
        run, feeder = _our_step(model, name == "stacked", weights, batch, seq_len, dtype)
        tokens = jax.device_put(ids, feeder.tokens_sharding)
        flags = jax.device_put(np.zeros((1,), bool), feeder.flags_sharding)
        start = time.perf_counter()
        first_loss[name] = run(tokens, flags)
        compile_s[name] = time.perf_counter() - start
        candidates[name] = (lambda run=run, tokens=tokens, flags=flags: run(tokens, flags))
    if reference:
        first_loss["torch"] = theirs(torch_ids)
        candidates["torch"] = lambda: theirs(torch_ids)
    for _ in range(2):  # warm-up
        for fn in candidates.values():
            fn()
    seconds = interleaved_seconds(candidates, repeats)  # each step returns its loss as a float: it has finished
    results = {"shape": shape, "params": sum(x.size for x in jax.tree.leaves(nnx.state(model))),
               "batch": batch, "seq_len": seq_len, "exit_layers": list(config.exit_layers), "weights": weights,
               "dtype": dtype, "device": jax.devices()[0].device_kind, "torch_device": device,
               "torch_threads": torch.get_num_threads(), "first_loss": first_loss, "jax_compile_s": compile_s}
    results.update(_rates(model, seconds, batch, seq_len, peak))
    return results


def _checked(family: str, fields: dict, batch: int, seq_len: int, repeats: int, layouts, exits) -> tuple[list, dict]:
    """(the exits, sorted with the last layer, and the config fields without dropout) or a GreencodeError."""
    if batch <= 0 or seq_len < 2 or repeats <= 0:
        raise GreencodeError("--batch and --repeats must be positive and --seq-len at least 2")
    if not layouts or any(layout not in ("stacked", "per_layer") for layout in layouts):
        raise GreencodeError(f"--layouts {list(layouts)}: choose from stacked, per_layer")
    n_layers = fields["num_hidden_layers"]
    exits = sorted(set(exits if exits else range(1, n_layers, 2)) | {n_layers - 1})
    if any(not 0 <= e < n_layers for e in exits):
        raise GreencodeError(f"--exit-layers {exits}: outside 0..{n_layers - 1}")
    if seq_len > fields["max_position_embeddings"]:
        raise GreencodeError(f"--seq-len {seq_len} exceeds the shape's {fields['max_position_embeddings']} positions")
    if family == "opt":  # the same function on both sides: no dropout (our models have none)
        fields = {**fields, "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0}
    return exits, fields


def _same_weights(family: str, fields: dict, exits):
    """(transformers' model in train mode, ours with `exits`) on the same random weights, seed 0."""
    import torch
    import transformers

    config_class = transformers.OPTConfig if family == "opt" else transformers.LlamaConfig
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(config_class(**fields)).to(torch.float32).train()
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        torch_model.save_pretrained(tmp)
        model = load_pretrained(tmp, "float32", exit_layers=exits, scan_layers=True)
    return torch_model, model


def _rates(model, seconds: dict, batch: int, seq_len: int, peak: float | None) -> dict:
    """Tokens/s of each layout (and PyTorch's, when timed), their ratio, the faster layout's MFU."""
    seconds = dict(seconds)
    torch_s = seconds.pop("torch", None)
    best = min(seconds, key=seconds.get)
    tokens_per_step = batch * seq_len
    peak = peak if peak is not None else peak_flops(jax.devices()[0].device_kind)
    flops_per_token = train_flops_per_token(model, model.config.exit_layers, seq_len)
    rates = {"jax_layout_step_s": seconds, "jax_best_layout": best, "jax_step_s": seconds[best],
             "jax_tokens_per_s": tokens_per_step / seconds[best], "target": TARGET_RATIO,
             "flops_per_token": flops_per_token, "peak_flops": peak,
             "mfu": None if peak is None else flops_per_token * tokens_per_step / seconds[best] / peak,
             "target_mfu": TARGET_MFU}
    if torch_s is not None:
        rates.update(torch_step_s=torch_s, torch_tokens_per_s=tokens_per_step / torch_s,
                     speed_ratio=torch_s / seconds[best])
    return rates


def format_bench_train(r: dict) -> str:
    """The header and figures of `run_bench_train`, each beside its target."""
    tokens = r["batch"] * r["seq_len"]
    torch_side = "" if r["torch_device"] is None else (
        f", torch on {r['torch_device']}" + (f" with {r['torch_threads']} threads" if r["torch_device"] == "cpu" else ""))
    lines = [f"bench train: shape {r['shape']} ({r['params'] / 1e6:.1f}M parameters), batch {r['batch']} x "
             f"{r['seq_len']} tokens, exits {r['exit_layers']}, {r['dtype']}, {r['device']}{torch_side}",
             "  first-step loss          " + "   ".join(f"{k} {v:.5f}" for k, v in r["first_loss"].items())]
    for layout, seconds in r["jax_layout_step_s"].items():
        lines.append(f"  greencode-jax, {layout + ' layers':17s}{tokens / seconds:8.1f} tokens/s   "
                     f"({seconds * 1e3:.1f} ms/step, compile {r['jax_compile_s'][layout]:.1f} s)")
    lines.append(f"  greencode-jax train step {r['jax_tokens_per_s']:10.1f} tokens/s   ({r['jax_best_layout']} layout)")
    if "speed_ratio" in r:
        lines += [f"  transformers PyTorch     {r['torch_tokens_per_s']:10.1f} tokens/s   "
                  f"({r['torch_step_s'] * 1e3:.1f} ms/step)",
                  f"  ratio ours / PyTorch     {r['speed_ratio']:10.2f} x   (target >= {r['target']:.1f} x: "
                  f"{verdict(r['speed_ratio'] >= r['target'])})"]
    achieved = r["flops_per_token"] * r["jax_tokens_per_s"]
    if r["mfu"] is None:
        lines.append(f"  model FLOPs              {achieved / 1e12:10.3f} TFLOP/s  ({r['flops_per_token'] / 1e9:.2f} "
                     f"GFLOP/token; no MFU: peak of {r['device']!r} unknown, pass --peak-tflops)")
    else:
        lines.append(f"  model FLOPs utilisation  {100 * r['mfu']:10.1f} %   ({achieved / 1e12:.1f} of "
                     f"{r['peak_flops'] / 1e12:.1f} TFLOP/s, {r['flops_per_token'] / 1e9:.2f} GFLOP/token; aim >= "
                     f"{100 * r['target_mfu']:.0f} %: {verdict(r['mfu'] >= r['target_mfu'])})")
    return "\n".join(lines)
