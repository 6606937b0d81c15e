"""`greencode bench heads`: exit-head training against GREEN-CODE's full fine-tune, in one run.

Both steps are the ones `greencode finetune` runs (train.method heads and full, train/methods.py),
on the same model, exits, batch and tokens; they are timed interleaved (one of each, repeated) so
background load hits both alike, and compared as tokens per second. The heads step is also timed
on cached hidden states (what every epoch after the first replays), where the backbone forward is
gone too. The arithmetic beside the figures: multiply-accumulates per token of each step, from
the model's shapes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from greencode_jax.bench.zoo import shape_fields
from greencode_jax.convert import load_pretrained
from greencode_jax.errors import GreencodeError
from greencode_jax.models import ModelConfig, init_model
from greencode_jax.parallel import make_mesh
from greencode_jax.config import FinetuneConfig, ModelSection, TrainSection
from greencode_jax.train.feed import BatchFeeder
from greencode_jax.train.methods import ExitHeadsTraining, FullFinetune, heads_config
from greencode_jax.train.optimizer import learning_rate_schedule, make_optimizer
from greencode_jax.train.weights import exit_weights

TARGET_RATIO = 5.0  # exit-head training >= 5x the full fine-tune's tokens/s, same model and batch


def step_macs(config, heads: int) -> dict:
    """Multiply-accumulates per token: the decoder layers' matrices (L), one LM head (H)."""
    e, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    mlp = (3 if config.family == "llama" else 2) * e * f
    layer = e * (q + 2 * kv) + q * e + mlp
    head = config.vocab_size * config.word_embed_dim
    backbone = config.num_layers * layer
    exits = len(config.exit_layers)
    return {"layer": layer, "lm_head": head,
            # forward + backward (x2 for inputs, x1 for weights) of the backbone and of every exit's head
            "full": 3 * backbone + 3 * exits * head,
            # backbone forward without gradients, the teacher's head, each student head forward + input gradient
            "heads": backbone + head + 2 * heads * head,
            "heads_cached": head + 2 * heads * head}


def run_bench_heads(*, model: str | None = None, shape: str | None = None, exit_layers=None, batch: int = 8,
                    seq_len: int = 128, repeats: int = 3, seed: int = 0) -> dict:
    """The heads step (frozen backbone; also on cached hidden states) against the full fine-tune's on
    the same model, exits and tokens: `model` (a model directory, GGUF file or checkpoint) or a random
    model of the built-in `shape`, with `exit_layers` (default: the model's own)."""
    if (model is None) == (shape is None):
        raise GreencodeError("give --model DIR (a model directory, GGUF file or checkpoint) or --shape NAME")
    for name, value in (("batch", batch), ("seq_len", seq_len), ("repeats", repeats)):
        if value < 1:
            raise GreencodeError(f"--{name.replace('_', '-')} {value}: expected a positive number")
    if model is not None:
        lm = load_pretrained(model, exit_layers=exit_layers, scan_layers=True)
    else:
        family, fields = shape_fields(shape)
        lm = init_model(ModelConfig.from_hf({"model_type": family, **fields}, exit_layers=exit_layers))
    if len(lm.config.exit_layers) < 2:
        raise GreencodeError("the model has no exit before its last layer: pass --exit-layers")
    return time_heads(lm, batch=batch, seq_len=seq_len, repeats=repeats, seed=seed)


def time_heads(model, *, batch: int, seq_len: int, repeats: int, seed: int = 0) -> dict:
    """Interleaved timing of the three steps on `model` (an EarlyExitLM with at least two exits)."""
    model.set_scan_layers(True)
    config = model.config
    cfg = FinetuneConfig(model=ModelSection(init="bench", scan_layers=True),
                         train=TrainSection(method="heads", batch_size=batch))
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    schedule = learning_rate_schedule(1e-4, 0, 1_000_000)
    optimizer = make_optimizer(schedule, 0.01, 1.0)
    feeder = BatchFeeder(mesh, 1, batch, seq_len)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    place = lambda tree, shardings: jax.device_put(tree, shardings)  # noqa: E731

    full_config = config.replace(exit_head="", exit_head_rank=0)
    weights = exit_weights("uniform", full_config.exit_layers, full_config.num_layers)
    full = FullFinetune(full_config, weights, optimizer, schedule, cfg, mesh)
    full_params = {k: v for k, v in params.items() if k != "exit_heads"}
    full_state = full.initial_state(jax.tree.map(jnp.copy, full_params), place)
    full_step = full.make_step(feeder)

    head_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, head="affine"))
    heads = ExitHeadsTraining(heads_config(full_config, head_cfg), weights, optimizer, schedule, head_cfg, mesh)
    heads_state = heads.initial_state(full_params, place)
    heads_step = heads.make_step(feeder)

    rng = np.random.default_rng(seed)
    tokens = feeder.tokens(rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32))
    flags = feeder.stop_flags(False)
    hidden = heads.backbone_hidden(tokens)

    def timed(step, state, inputs):
        start = time.perf_counter()
        state, metrics = step(state, inputs, flags)
        jax.block_until_ready(metrics)
        return state, time.perf_counter() - start

    full_state, _ = timed(full_step, full_state, tokens)  # compile and first-run costs
    heads_state, _ = timed(heads_step, heads_state, tokens)
    cached_step = heads.make_cached_step(feeder)
    heads_state, _ = timed(cached_step, heads_state, hidden)
    times = {"full": [], "heads": [], "heads_cached": []}
    for _ in range(repeats):
        full_state, seconds = timed(full_step, full_state, tokens)
        times["full"].append(seconds)
        heads_state, seconds = timed(heads_step, heads_state, tokens)
        times["heads"].append(seconds)
        heads_state, seconds = timed(cached_step, heads_state, hidden)
        times["heads_cached"].append(seconds)
    per_step = batch * seq_len
    rates = {k: per_step / statistics.median(v) for k, v in times.items()}
    macs = step_macs(full_config, len(full_config.exit_layers) - 1)
    return {"model": f"{config.family}, {config.num_layers} layers, hidden {config.hidden_size}, vocab "
                     f"{config.vocab_size}", "exit_layers": list(full_config.exit_layers), "batch": batch,
            "seq_len": seq_len, "repeats": repeats, "device": jax.devices()[0].device_kind,
            "seconds": times, "tokens_per_s": rates,
            "ratio": {"heads": rates["heads"] / rates["full"], "heads_cached": rates["heads_cached"] / rates["full"]},
            "macs_per_token": macs,
            "mac_ratio": {"heads": macs["full"] / macs["heads"], "heads_cached": macs["full"] / macs["heads_cached"]},
            "target_ratio": TARGET_RATIO}


def format_bench_heads(r: dict) -> str:
    """The header, each step's tokens/s beside the multiply-accumulates' prediction, and the target."""
    lines = [f"bench heads: {r['model']}; exits {r['exit_layers']}; batch {r['batch']} x {r['seq_len']} tokens; "
             f"{r['repeats']} interleaved rounds on {r['device']} (medians)"]
    full = r["tokens_per_s"]["full"]
    for name, label in (("full", "full fine-tune (every parameter)"), ("heads", "exit heads, frozen backbone"),
                        ("heads_cached", "exit heads on cached hidden states")):
        rate = r["tokens_per_s"][name]
        ratio = "" if name == "full" else (f"  {rate / full:5.2f}x the full fine-tune  (MACs predict "
                                           f"{r['mac_ratio'][name]:.2f}x)")
        lines.append(f"  {label:<38} {rate:9,.0f} tokens/s{ratio}")
    m = r["macs_per_token"]
    lines.append(f"  per token: a layer {m['layer'] / 1e6:.2f}M MACs, the LM head {m['lm_head'] / 1e6:.2f}M; full "
                 f"{m['full'] / 1e6:.0f}M, heads {m['heads'] / 1e6:.0f}M, heads cached {m['heads_cached'] / 1e6:.0f}M")
    best = max(r["ratio"].values())
    verdict = "meets" if best >= r["target_ratio"] else "misses"
    lines.append(f"  target >= {r['target_ratio']:.0f}x: {verdict} ({best:.2f}x at best)")
    return "\n".join(lines)
