"""The two ways of training exits, behind one interface the run loop (loop.py) drives.

* `FullFinetune` (train.method: full, GREEN-CODE's): every parameter is trained with the
  aggregated exit cross-entropy (losses.py). The train state's params are the whole model.
* `ExitHeadsTraining` (train.method: heads): a small head per exit (models/heads.py) is trained by
  distillation from the last layer (distill.py) on a frozen backbone. The train state holds the
  heads only; the backbone, final norm and LM head stay as loaded, bit for bit, and are passed to
  each step as an argument (never saved in a training checkpoint, never differentiated). Each
  step runs the backbone forward once, without gradients; when the run reads its batches more
  than once, their hidden states are computed once and replayed from a memory-mapped cache
  (hidden_cache.py).

Both give: the state's abstract tree and shardings, its initial value, the jitted step
`step(state, inputs, stop_flags) -> (state, metrics)`, the step's inputs for a step number, and
the whole model's parameters for evaluation and the final checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from greencode_jax.config import METHODS
from greencode_jax.errors import GreencodeError
from greencode_jax.models import abstract_model
from greencode_jax.models.heads import ExitHeads
from greencode_jax.train.distill import distill_metrics
from greencode_jax.train.sharding import replicated, tree_shardings
from greencode_jax.train.step import cast_tree, compute_graphdef, init_state, make_train_step, state_shardings

HEADS = "exit_heads"


class FullFinetune:
    name = "full"

    def __init__(self, config, weights, optimizer, schedule, cfg, mesh):
        self.config, self.weights, self.optimizer, self.schedule, self.cfg, self.mesh = (
            config, weights, optimizer, schedule, cfg, mesh)
        abstract_params = nnx.to_pure_dict(nnx.state(abstract_model(config, cfg.model.dtype), nnx.Param))
        self.abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.run.seed), abstract_params)
        self.shardings = state_shardings(self.abstract_state, config, mesh)

    def initial_state(self, host_params, place):
        params = place(host_params, self.shardings["params"])
        return jax.jit(lambda p: init_state(p, self.optimizer, self.cfg.run.seed), out_shardings=self.shardings)(params)

    def make_step(self, feeder):
        return make_train_step(self.config, self.weights, self.optimizer, self.schedule, self.cfg.model.compute_dtype,
                               self.shardings, feeder.tokens_sharding, feeder.flags_sharding)

    def params(self, state):
        return state["params"]

    def inputs(self, step: int, stream, feeder):
        return feeder.tokens(next(stream)["tokens"])

    def param_shardings(self):
        return self.shardings["params"]


def heads_config(config, cfg):
    """The model config the heads method trains: the source's, with exit heads of train.head."""
    t = cfg.train
    if config.exit_head and (config.exit_head, config.exit_head_rank) != (t.head, t.head_rank if t.head == "lowrank"
                                                                          else config.exit_head_rank):
        raise GreencodeError(f"model.init has {config.exit_head} exit heads, but train.head={t.head!r}"
                             + (f" (rank {t.head_rank})" if t.head == "lowrank" else "")
                             + "; train the heads it has, or start from a model without heads")
    if len(config.exit_layers) < 2:
        raise GreencodeError("train.method=heads needs an exit before the last layer (model.exit_layers)")
    return config.replace(exit_head=t.head, exit_head_rank=t.head_rank if t.head == "lowrank" else 0)


class ExitHeadsTraining:
    name = "heads"

    def __init__(self, config, weights, optimizer, schedule, cfg, mesh):
        self.config, self.optimizer, self.schedule, self.cfg, self.mesh = config, optimizer, schedule, cfg, mesh
        self.weights = list(weights[:-1])  # one per head: the last layer has none
        self.frozen = None  # the backbone's parameters, placed once (initial_state)
        abstract = nnx.to_pure_dict(nnx.state(abstract_model(config, cfg.model.dtype), nnx.Param))
        self.abstract_frozen = {k: v for k, v in abstract.items() if k != HEADS}
        self.abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.run.seed), abstract[HEADS])
        self.shardings = jax.tree.map(lambda _: replicated(mesh), self.abstract_state)  # small: every device
        self.frozen_shardings = tree_shardings(self.abstract_frozen, mesh, config.hidden_size, config.word_embed_dim)
        self.cache = None

    def initial_heads(self) -> dict:
        """Zero heads (a low-rank head's down-projection drawn from run.seed)."""
        heads = ExitHeads(self.config, self.cfg.model.dtype, nnx.Rngs(self.cfg.run.seed))
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(heads, nnx.Param)))

    def place_frozen(self, host_params, place):
        frozen = {k: v for k, v in host_params.items() if k != HEADS}
        self.frozen = place(frozen, self.frozen_shardings)
        return host_params.get(HEADS)

    def initial_state(self, host_params, place):
        heads = self.place_frozen(host_params, place)
        heads = place(heads if heads is not None else self.initial_heads(), self.shardings["params"])
        return jax.jit(lambda p: init_state(p, self.optimizer, self.cfg.run.seed), out_shardings=self.shardings)(heads)

    def params(self, state):
        return {**self.frozen, HEADS: state["params"]}

    def param_shardings(self):
        return {**self.frozen_shardings, HEADS: self.shardings["params"]}

    def _model(self, heads, frozen):
        graphdef = compute_graphdef(self.config, self.cfg.model.compute_dtype)
        return nnx.merge(graphdef, cast_tree({**frozen, HEADS: heads}, self.cfg.model.compute_dtype))

    def _hidden(self, frozen, tokens):
        """The frozen backbone's exit states for tokens [B, T]: ([n_exits, B*(T-1), E], next tokens [B*(T-1)])."""
        model = self._model(jax.tree.map(jnp.zeros_like, self.abstract_state["params"]), frozen)
        hidden = jax.lax.stop_gradient(model(tokens).exit_hidden[:, :, :-1])
        n, b, length, e = hidden.shape
        return hidden.reshape(n, b * length, e), tokens[:, 1:].reshape(-1)

    def _loss(self, heads, frozen, hidden, targets):
        t = self.cfg.train
        out = distill_metrics(self._model(heads, frozen), hidden, targets, self.weights, t.kd_temperature,
                              t.ce_weight)
        return out.loss, out

    def _update(self, state, grads, loss, out, stop_flags):
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        new_heads = optax.apply_updates(state["params"], updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        metrics = {"loss": loss, "exit_loss": out.exit_loss, "exit_accuracy": out.exit_accuracy, "kl": out.kl,
                   "agreement": out.agreement, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(new_heads), "learning_rate": self.schedule(state["step"]),
                   "stop": jnp.any(stop_flags)}
        return {"step": state["step"] + 1, "params": new_heads, "opt_state": opt_state, "rng": rng}, metrics

    def make_step(self, feeder):
        """step(state, tokens [A, B, T], stop_flags): the backbone forward and the heads' update, one program."""
        grad_fn = jax.value_and_grad(lambda heads, frozen, tokens: self._loss(heads, frozen,
                                                                             *self._hidden(frozen, tokens)),
                                     has_aux=True)

        def step(state, frozen, tokens, stop_flags):
            (loss, out), grads = _accumulate(lambda micro: grad_fn(state["params"], frozen, micro), tokens)
            return self._update(state, grads, loss, out, stop_flags)

        jitted = jax.jit(step, in_shardings=(self.shardings, self.frozen_shardings, feeder.tokens_sharding,
                                             feeder.flags_sharding),
                         out_shardings=(self.shardings, replicated(self.mesh)), donate_argnums=(0,))
        return lambda state, tokens, stop_flags: jitted(state, self.frozen, tokens, stop_flags)

    def make_cached_step(self, feeder):
        """step(state, (hidden [A, n_exits, N, E], targets [A, N]), stop_flags): the update on cached states."""
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def step(state, frozen, inputs, stop_flags):
            (loss, out), grads = _accumulate(lambda micro: grad_fn(state["params"], frozen, *micro), inputs)
            return self._update(state, grads, loss, out, stop_flags)

        jitted = jax.jit(step, out_shardings=(self.shardings, replicated(self.mesh)), donate_argnums=(0,))
        return lambda state, inputs, stop_flags: jitted(state, self.frozen, inputs, stop_flags)

    def backbone_hidden(self, tokens):
        """(hidden [A, n_exits, N, E], targets [A, N]) of tokens [A, B, T]: what a cache holds."""
        if not hasattr(self, "_hidden_jit"):
            self._hidden_jit = jax.jit(lambda frozen, tokens: jax.lax.map(lambda t: self._hidden(frozen, t), tokens))
        return self._hidden_jit(self.frozen, tokens)

    def use_cache(self, directory, total_steps: int, stream, max_bytes: float) -> str:
        """Replays hidden states from `directory` when the run reads its batches more than once and
        they fit in `max_bytes`; returns what it decided, for the run's header."""
        batches = stream.batches_per_epoch
        if total_steps <= batches:
            return "hidden states computed in each step (one pass over the data)"
        c, t = self.config, self.cfg.train
        per_batch = len(c.exit_layers) * t.batch_size * t.grad_accum * (self.cfg.data.seq_len - 1) * c.hidden_size * 4
        if per_batch * batches > max_bytes:
            return (f"hidden states computed in each step: {batches} batches would take "
                    f"{per_batch * batches / 1e9:.1f} GB of cache (train.cache_gb={max_bytes / 1e9:g})")
        self.cache = HiddenCache(directory, self.cfg.run.seed, batches)
        return f"hidden states of the {batches} batches of an epoch cached once in {directory}, replayed after"

    def inputs(self, step: int, stream, feeder):
        if self.cache is None:
            return feeder.tokens(next(stream)["tokens"])
        index = self.cache.batch_of(step)
        cached = self.cache.get(index)
        if cached is None:
            hidden, targets = self.backbone_hidden(feeder.tokens(stream.batch(index)["tokens"]))
            cached = self.cache.put(index, np.asarray(hidden), np.asarray(targets))
        return tuple(jnp.asarray(x) for x in cached)

    def make_any_step(self, feeder):
        """The step `inputs` feeds: on tokens, or on cached hidden states."""
        return self.make_cached_step(feeder) if self.cache is not None else self.make_step(feeder)


class HiddenCache:
    """Per batch of the first epoch: the frozen backbone's exit states and next tokens, as .npy
    files written atomically (memory-mapped when read). Later epochs replay the same batches in a
    new order each epoch, drawn from the run's seed."""

    def __init__(self, directory, seed: int, batches: int):
        self.directory, self.seed, self.batches = Path(directory), seed, batches
        self.directory.mkdir(parents=True, exist_ok=True)

    def batch_of(self, step: int) -> int:
        epoch, position = divmod(step, self.batches)
        if epoch == 0:
            return position
        order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0xCAC4E])).permutation(self.batches)
        return int(order[position])

    def _path(self, index: int, name: str):
        return self.directory / f"{index:06d}.{name}.npy"

    def get(self, index: int):
        paths = [self._path(index, name) for name in ("hidden", "targets")]
        if not all(p.is_file() for p in paths):
            return None
        return tuple(np.load(p, mmap_mode="r") for p in paths)

    def put(self, index: int, hidden, targets):
        for name, array in (("targets", targets), ("hidden", hidden)):  # hidden last: it marks the batch done
            path = self._path(index, name)
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, path)
        return hidden, targets


def _accumulate(grad_fn, micro_batches):
    """(loss, metrics), gradients: the mean of grad_fn over the micro-batches (a pytree whose
    leaves lead with the micro-batch axis A)."""
    accum = jax.tree.leaves(micro_batches)[0].shape[0]
    if accum == 1:
        return grad_fn(jax.tree.map(lambda x: x[0], micro_batches))

    def micro(carry, batch):
        return jax.tree.map(jnp.add, carry, grad_fn(batch)), None

    first = jax.eval_shape(grad_fn, jax.tree.map(lambda x: x[0], micro_batches))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    total, _ = jax.lax.scan(micro, zeros, micro_batches)
    return jax.tree.map(lambda x: x / accum, total)


def make_method(name: str, config, weights, optimizer, schedule, cfg, mesh):
    if name not in METHODS:
        raise GreencodeError(f"train.method={name!r}: expected one of {list(METHODS)}")
    cls = FullFinetune if name == "full" else ExitHeadsTraining
    return cls(config, weights, optimizer, schedule, cfg, mesh)
